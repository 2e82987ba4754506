"""Raw TRL DPO baseline: the script a user would write from the TRL docs (`DPOTrainer` with a `peft_config`).

The preference JSONL (conversational prompt / chosen / rejected) goes to DPOTrainer as loaded; TRL loads the
policy by path and, with a peft_config, uses the adapter-disabled policy as the reference (no second model);
LoRA r16 on every linear layer; sigmoid loss, beta 0.1 (TRL's defaults). Prints one JSON line: pairs/s over
`trainer.train()` (steps x batch / the Trainer's train_runtime) and the peak RSS.
"""

from datasets import load_dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from align.bench.child import parse_args, report

a = parse_args()
dataset = load_dataset("json", data_files=a.data, split="train")
trainer = DPOTrainer(
    model=a.model,
    train_dataset=dataset,
    args=DPOConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch, max_length=a.max_length,
                   bf16=a.dtype == "bfloat16", model_init_kwargs={"dtype": a.dtype}, report_to="none"),
    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
)
runtime = trainer.train().metrics["train_runtime"]
pairs = trainer.state.global_step * a.batch
report(pairs_per_second=pairs / runtime, train_runtime=runtime, pairs_seen=pairs,
       activation_checkpointing=getattr(trainer.args, "activation_checkpointing", trainer.args.gradient_checkpointing), bf16=trainer.args.bf16)
