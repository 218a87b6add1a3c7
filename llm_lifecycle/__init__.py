"""The whole life of a large language model, from raw text to an aligned chat model, as executable notebooks

Modules:

- `llm_lifecycle.cli`: Run the stage notebooks in order with papermill, with validated parameters, into one run directory.
- `llm_lifecycle.core`: Presets, the run directory, device choice, seeding and atomic artifact IO: what every stage shares.
- `llm_lifecycle.encoding`: Every split tokenized once into a flat array of ids on disk, and the loaders that cut training and evaluation windows out of it.
- `llm_lifecycle.pretrain`: Causal-language-model pretraining in one readable loop: AdamW, warmup and cosine decay, clipping, accumulation, bf16 and `torch.compile` on a GPU, evaluation in bits per byte, exact resume from checkpoints, and experiments on the learning rate and the model size.
- `llm_lifecycle.tokenizer`: Byte-level BPE built from scratch, then trained for real with `tokenizers`, compared with SentencePiece, and wrapped as a Hugging Face tokenizer with special tokens and a chat template."""

__version__ = "0.1.0"
