"""vllm.distributed: `cleanup_dist_env_and_memory(shutdown_ray=False)` (distributed/parallel_state.py, 0.10.0-0.33.0),
what vLLM's tests call between two engines in one process; it destroys torch's default process group, so align
calls it only when no trainer's process group is up. The fake counts calls (read by the tests)."""

calls = 0


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    global calls
    if not isinstance(shutdown_ray, bool):
        raise TypeError("shutdown_ray must be a bool")
    calls += 1
