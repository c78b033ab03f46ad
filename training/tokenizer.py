"""Train the demo model's tokenizer: byte-level BPE plus LLaDA's special tokens.

The BPE is learnt from the pre-training prose and the SFT pairs, so both the
novels and the definition questions tokenize compactly. The six special tokens
take the last ids of the embedding (mask last); their names are LLaDA's, so the
chat template and every tool written for LLaDA-8B work unchanged. Writes
tokenizer.json and tokenizer_config.json (with the chat template) into --out.

    python3 training/tokenizer.py --data training/data/out --out runs/demo --vocab 4096
"""

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|mdm_mask|>"]

# The same template as LLaDA-8B-Instruct's tokenizer_config.json (Llama-3 headers).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def training_text(data_dir):
    """Every paragraph of the training split and every training pair, once."""
    with open(os.path.join(data_dir, "pretrain_train.txt"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")
    with open(os.path.join(data_dir, "sft_train.jsonl"), encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            yield pair["prompt"]
            yield pair["response"]


def train(data_dir, vocab_size, max_length):
    bpe_size = vocab_size - len(SPECIALS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(data_dir), trainer=trainer)
    assert tok.get_vocab_size() == bpe_size, f"BPE learnt {tok.get_vocab_size()} tokens, wanted {bpe_size}"
    tok.add_special_tokens(SPECIALS)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert ids["<|mdm_mask|>"] == vocab_size - 1, ids
    # Plain prompts start with BOS, as with LLaDA's tokenizer.
    bos = "<|startoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, ids[bos])])
    config = {
        "bos_token": bos, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": max_length, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tok, config, ids


def special_ids(tokenizer_dir):
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    return {s: tok.token_to_id(s) for s in SPECIALS}


def render_chat(prompt):
    """The chat prompt exactly as remask renders it (same template, same trim)."""
    import jinja2

    env = jinja2.Environment()
    return env.from_string(CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": prompt}], bos_token=SPECIALS[0], add_generation_prompt=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="training/data/out")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096, help="embedding size: BPE tokens + 6 specials")
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args()
    tok, config, ids = train(a.data, a.vocab, a.max_length)
    os.makedirs(a.out, exist_ok=True)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    sample = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    print(json.dumps({"vocab": a.vocab, "specials": ids, "sample_tokens": len(tok.encode(sample).ids)}))


if __name__ == "__main__":
    main()
