"""The whole life of a large language model, from raw text to an aligned chat model, as executable notebooks

Modules:

- `llm_lifecycle.cli`: Run the stage notebooks in order with papermill, with validated parameters, into one run directory.
- `llm_lifecycle.constellation`: A router that sends each request to the model best at it, a judge that picks among several models' answers, a draft model that makes the target generate faster without changing a token, the model exported to ONNX Runtime with its KV cache, and the whole constellation on Ray Serve.
- `llm_lifecycle.core`: Presets, the run directory, device choice, seeding and atomic artifact IO: what every stage shares.
- `llm_lifecycle.data`: Collect raw documents, clean them step by step, remove duplicates and near-duplicates, and split them.
- `llm_lifecycle.encoding`: Every split tokenized once into a flat array of ids on disk, and the loaders that cut windows out of it.
- `llm_lifecycle.generation`: From next-token logits to text: greedy, temperature, top-k, top-p, repetition penalty, stop tokens, beam search and the KV cache, written from scratch and checked token for token against `transformers`' `generate`.
- `llm_lifecycle.model`: A decoder-only transformer built from scratch, piece by piece, and proven to be Llama: same logits as `transformers`' `LlamaForCausalLM`, exported as a standard Hugging Face model folder.
- `llm_lifecycle.peft_tuning`: LoRA written out and checked against PEFT, QLoRA's 4-bit NormalFloat from scratch and bit for bit against bitsandbytes, prompt tuning and P-tuning, and one table that compares them with full and last-layer fine-tuning on the same data and steps.
- `llm_lifecycle.pretrain`: Causal-LM pretraining in one readable loop, measured in bits per byte, resumed exactly, scaled out with Accelerate.
- `llm_lifecycle.reward`: Preference pairs sampled from the SFT model and ranked by a simulated annotator, loaders and a validator for real preference data, and a reward model trained with the Bradley–Terry loss, written out and checked against TRL's `RewardTrainer`.
- `llm_lifecycle.rlhf`: PPO written out on our own transformer and generation code, DPO and GRPO with TRL, best-of-N as the baseline, all judged by the simulated annotator of stage 09 on the same held-out prompts, and what happens when a policy optimises a reward model that is only a proxy.
- `llm_lifecycle.sft`: Alpaca, ShareGPT and chat-message data with a validator, checkable tasks made by the project, data augmentation, supervised fine-tuning with TRL's `SFTTrainer` on the assistant's tokens only, and retraining the last layers for a classification task.
- `llm_lifecycle.tokenizer`: Byte-level BPE from scratch, then trained with `tokenizers`, compared with SentencePiece, wrapped for `transformers`."""

__version__ = "0.1.0"
