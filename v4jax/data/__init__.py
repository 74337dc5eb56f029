"""v4jax.data: the embedded default corpus, tokenizers and a resumable grain packing pipeline.

cfg = default_data_config(); validate_data_config(cfg)
tok = build_tokenizer(cfg)
it = build_pipeline(cfg, tokenizer=tok, split="train", seq_len=256, batch_size=8, seed=0)
batch = next(it)              # tokens, segment_ids, positions, targets, loss_mask: [B, S]
state = it.get_state()        # JSON; it.set_state(state) resumes exactly
# several processes: build_pipeline(..., process_index=jax.process_index(), process_count=jax.process_count())
# yields this process's rows of each global batch (process_rows); MeshPlan.put_batch(b, process_local=True)
"""

from v4jax.data.config import default_data_config, validate_data_config
from v4jax.data.corpus import Corpus, load_corpus
from v4jax.data.pipeline import (
    DataIterator,
    build_pipeline,
    next_token_targets,
    process_rows,
)
from v4jax.data.stats import corpus_stats
from v4jax.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "DataIterator",
    "HFTokenizer",
    "build_pipeline",
    "build_tokenizer",
    "corpus_stats",
    "default_data_config",
    "load_corpus",
    "next_token_targets",
    "process_rows",
    "validate_data_config",
]
