"""Create a tiny random causal LM, its tokenizer and a small SFT dataset locally (no downloads).

The other examples and the tests use it to run end to end on CPU in seconds:

    python examples/make_tiny.py /tmp/tiny          # writes /tmp/tiny/model and /tmp/tiny/data.jsonl
    fused-objectives probe --model /tmp/tiny/model --data /tmp/tiny/data.jsonl

The tokenizer is character-level (built with the `tokenizers` library), adds a BOS token, knows
`</s>` as EOS and carries a ChatML-style chat template; the data are arithmetic questions with
`prompt`, `response` and `messages` fields.
"""
import argparse
import json
import os
import random
import sys

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-*=?.,:!\n")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """A character-level fast tokenizer: BOS added by default, EOS `</s>`, pad `<pad>`, chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tokenizer, *, family="llama", vocab_size=None, hidden=64, layers=2, heads=4, max_positions=2048,
               seed=0, **config_overrides):
    """A tiny random ``*ForCausalLM`` (``family``: llama, qwen2, gemma2, cohere, granite)."""
    import torch
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "cohere": ("CohereConfig", "CohereForCausalLM"),
               "granite": ("GraniteConfig", "GraniteForCausalLM")}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    cfg_name, model_name = classes[family]
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
               max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    cfg.update(config_overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**cfg)
    return getattr(transformers, model_name)(config).eval()


def make_records(n=32, seed=0):
    """Arithmetic questions, each with `prompt`, `response` and an equivalent `messages` conversation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt = f"what is {a}+{b}?"
        response = f"{a}+{b}={a + b}"
        out.append({"prompt": prompt, "response": response,
                    "messages": [{"role": "system", "content": "answer briefly."},
                                 {"role": "user", "content": prompt},
                                 {"role": "assistant", "content": response}]})
    return out


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def make_all(out_dir, *, n=32, family="llama", **model_kwargs):
    """Save `out_dir/model` (model + tokenizer) and `out_dir/data.jsonl`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    tok = make_tokenizer()
    model = make_model(tok, family=family, **model_kwargs)
    model_dir = os.path.join(out_dir, "model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(os.path.join(out_dir, "data.jsonl"), make_records(n))
    return model_dir, data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--family", default="llama")
    args = parser.parse_args(argv)
    model_dir, data = make_all(args.out_dir, n=args.examples, family=args.family)
    print(f"model and tokenizer: {model_dir}\ndata: {data}")


if __name__ == "__main__":
    # bad arguments or data: one line, no traceback
    try:
        main()
    except (ValueError, TypeError, OSError, KeyError) as exc:
        raise SystemExit(f"{sys.argv[0]}: error: {exc}") from None
