"""``python tests/support/make_vllm_model.py DIR``: a tiny random Llama that vLLM's CPU build serves,
with a LoRA adapter for it, made in a second from nothing downloaded.

Run with the vLLM environment's Python (it has torch, transformers, tokenizers and peft).
``DIR/model`` holds the model (safetensors, a byte-level BPE tokenizer trained here on a
few lines, a chat template) and ``DIR/lora`` a random LoRA (rank 8 on q and v). The
weights come from a fixed seed, so greedy answers are the same on every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEXT = [
    "The gateway forwards every request to the runtime and streams the answer back.",
    "A tiny model with random weights still answers, one token after another.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Letters: a b c d e f g h i j k l m.",
]
WINDOW = 16384
"""The model's context window: room for a generation of minutes, for a stream left or broken
while it runs."""
SPECIAL = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def make_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def make_model(out: Path, vocab: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64: vLLM's CPU attention refuses 16
        num_key_value_heads=2,
        max_position_embeddings=WINDOW,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    # Random weights rarely end on </s>: answers run to max_tokens, which tests want.
    GenerationConfig(bos_token_id=0, eos_token_id=1).save_pretrained(out)


def make_lora(model_dir: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)  # large enough to change greedy answers
    peft_model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    root = Path(sys.argv[1])
    model_dir, lora_dir = root / "model", root / "lora"
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(model_dir)
    make_model(model_dir, vocab)
    make_lora(model_dir, lora_dir)
    (root / "made.json").write_text(json.dumps({"vocab": vocab}))


if __name__ == "__main__":
    main()
