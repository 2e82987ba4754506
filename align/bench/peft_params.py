"""Trainable-parameter table for every PEFT method on a model (default: the embedded SmolLM2-135M-Instruct).

    python -m align.bench.peft_params [MODEL]
"""

from __future__ import annotations

import sys
import typing

from align.models.load import load_model, resolve_model
from align.models.peft import Method, PeftSettings, attach_peft, count_parameters


def main(model: str = "default") -> None:
    path = resolve_model(model)
    print("| method | trainable | total | % | what is trained |\n|---|---:|---:|---:|---|")
    for method in typing.get_args(Method):
        if method == "xlora":  # needs trained experts (README: its row is the gate over two rank-16 experts)
            continue
        base = load_model(path, dtype="float32", load_in_4bit=method == "qlora")
        peft_model, what = attach_peft(base, PeftSettings(method=method))
        trainable, total = count_parameters(peft_model)
        print(f"| {method} | {trainable:,} | {total:,} | {100 * trainable / total:.3f} | {what} |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
