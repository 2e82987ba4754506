"""LoRARequest. Source: vllm/lora/request.py, 0.10.0 and 0.33.0 (a msgspec.Struct in both).

Fields common to every version in range: lora_name: str, lora_int_id: int, lora_path: str = "",
base_model_name: str | None = None. `lora_int_id` must be >= 1 (0.10.0 checks it in
adapter_commons/request.py, 0.33.0 in __post_init__) and `lora_path` must not be empty (an assert in both).
Equality and hash use `lora_name` only, so two adapters must differ by name to be told apart.
"""

from __future__ import annotations

_FIELDS = ("lora_name", "lora_int_id", "lora_path", "base_model_name")


class LoRARequest:
    __slots__ = _FIELDS

    def __init__(self, *args: object, **kwargs: object) -> None:
        # The 4th field is lora_local_path in 0.10.0 but base_model_name in 0.33.0: only 3 are safe by position.
        if len(args) > 3:
            raise TypeError(f"Extra positional arguments provided: {args[3:]}")
        values = dict(zip(_FIELDS, args))
        for key, value in kwargs.items():
            if key not in _FIELDS:
                raise TypeError(f"Unexpected keyword argument '{key}'")
            if key in values:
                raise TypeError(f"Argument '{key}' given by name and position")
            values[key] = value
        for required in ("lora_name", "lora_int_id"):
            if required not in values:
                raise TypeError(f"Missing required argument '{required}'")
        self.lora_name = values["lora_name"]
        self.lora_int_id = values["lora_int_id"]
        self.lora_path = values.get("lora_path", "")
        self.base_model_name = values.get("base_model_name")
        if not isinstance(self.lora_name, str) or not isinstance(self.lora_path, str):
            raise TypeError("lora_name and lora_path must be str")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool):
            raise TypeError(f"lora_int_id must be an int, got {type(self.lora_int_id).__name__}")
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, value: object) -> bool:
        return isinstance(value, self.__class__) and self.lora_name == value.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)

    def __repr__(self) -> str:
        return f"LoRARequest(lora_name={self.lora_name!r}, lora_int_id={self.lora_int_id}, lora_path={self.lora_path!r})"
