"""Raw TRL SFT baseline: the script a user would write from the TRL docs (`SFTTrainer` + a `LoraConfig`).

The conversational `messages` JSONL goes to SFTTrainer as loaded; the model is given by path and loaded by TRL;
LoRA r16 on every linear layer. Everything else is TRL's default (e.g. gradient checkpointing on, loss on every
token). Prints one JSON line: tokens/s over `trainer.train()` (steps x batch x mean example length / the
Trainer's train_runtime, the measure `align sft` reports) and the peak RSS.
"""

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from align.bench.child import parse_args, report

a = parse_args()
dataset = load_dataset("json", data_files=a.data, split="train")
trainer = SFTTrainer(
    model=a.model,
    train_dataset=dataset,
    args=SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch, max_length=a.max_length,
                   bf16=a.dtype == "bfloat16", model_init_kwargs={"dtype": a.dtype}, report_to="none"),
    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
)
runtime = trainer.train().metrics["train_runtime"]
lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
mean, seen = sum(lengths) / len(lengths), trainer.state.global_step * a.batch
report(tokens_per_second=seen * mean / runtime, train_runtime=runtime, examples_seen=seen, mean_tokens=mean,
       activation_checkpointing=getattr(trainer.args, "activation_checkpointing", trainer.args.gradient_checkpointing), bf16=trainer.args.bf16)
