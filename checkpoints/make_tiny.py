"""Builds the tiny DeepSeek-V3-layout checkpoint shipped in `checkpoints/tiny_v3/` (needs torch).

It is made once with transformers, exactly as a hub checkpoint is (save_pretrained: per-expert
safetensors, config.json), plus a byte-level BPE tokenizer trained on `mla_jax/data/corpus.txt`
and transformers' float32 logits for a fixed prompt (`reference_logits.npz`). The demo checks our
model against those logits without torch; `tests/test_tiny_checkpoint.py` rebuilds everything
here and compares it with what is shipped.

    python -m checkpoints.make_tiny [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(HERE, "tiny_v3")
CORPUS = os.path.join(os.path.dirname(HERE), "mla_jax", "data", "corpus.txt")
PROMPT = "We hold these truths to be self-evident, that all men are created equal."
SEED = 0
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([CORPUS], trainer)
    # bos in front of every text, as DeepSeek's tokenizers do (and as fine-tuning packs documents)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def hf_config(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=1024, initializer_range=0.1, bos_token_id=bos_id, eos_token_id=eos_id,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


def make(out_dir: str) -> None:
    import torch
    from transformers import DeepseekV3ForCausalLM

    tok = train_tokenizer()
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    torch.manual_seed(SEED)
    model = DeepseekV3ForCausalLM(hf_config(tok.get_vocab_size(), bos_id, eos_id)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    tokens = np.array([tok.encode(PROMPT).ids], dtype=np.int64)  # starts with bos
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).logits.float().numpy()

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    tmp = tempfile.mkdtemp(prefix=".tiny_v3.", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True,
                       "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
        np.savez(os.path.join(tmp, "reference_logits.npz"), tokens=tokens.astype(np.int32), logits=logits,
                 prompt=np.array(PROMPT))
        with open(os.path.join(tmp, "provenance.json"), "w") as f:
            import transformers

            json.dump({"made_by": "python -m checkpoints.make_tiny", "seed": SEED,
                       "torch": torch.__version__, "transformers": transformers.__version__}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    make(sys.argv[1] if len(sys.argv) > 1 else SHIPPED)
