"""Stage 4, model: GPT-2 in plain PyTorch, generation with a KV cache, and the safetensors file format.

`gpt.py` is the whole network (embeddings, pre-LayerNorm blocks of causal self-attention through
SDPA and an MLP, tied output head) and the training loss, computed in chunks so the full logits
are never held. It loads and saves the Hugging Face layout (`config.json` + `model.safetensors`),
so `transformers.GPT2LMHeadModel` reads what we write and the other way round.

Read in this order:
1. `gpt.py`            - the model, its configs (`MODEL_CONFIGS`) and the fused chunked loss.
2. `generate.py`       - sampling with a KV cache: greedy, temperature, top-k, top-p, stop strings.
3. `safetensors_io.py` - the file format, read and written by hand.

Skip on a first reading: the Hugging Face checkpoint-name mapping at the end of `gpt.py`.

`from minicodeparrot.model import GPT, GPTConfig` is the public path.
"""

from minicodeparrot.model.gpt import GPT, MODEL_CONFIGS, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "MODEL_CONFIGS"]
