"""The configuration schema: one dataclass per section, with defaults. YAML files are instances of
`Config`; `jaxllm.config.loading` reads them and `jaxllm.config.checks` validates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class JaxllmError(Exception):
    """An error a user can act on; the CLI prints its message on one line, without a traceback."""


class ConfigError(JaxllmError):
    pass


# ----------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `type: llama3` is Llama-3.1's; `linear` divides positions by `factor`."""

    type: Literal["linear", "llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ElectraGenerator:
    """ELECTRA pre-training: a small masked-LM generator trained with the discriminator (model.*),
    sharing its token, position and token-type embeddings. Sizes default to a quarter of the
    discriminator's width with the same depth."""

    d_model: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    discriminator_weight: float = 50.0  # loss = mlm + weight * replaced-token detection


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs (docs/moe.md): token-choice top-k routing over `num_experts` expert MLPs.

    Layer i is a mixture when (i + 1) % every == 0 (Qwen2-MoE's decoder_sparse_step; Mixtral: every=1);
    the other layers keep a dense MLP of model.mlp_dim."""

    num_experts: int = 8
    experts_per_token: int = 2  # k of top-k
    every: int = 1
    expert_mlp_dim: Optional[int] = None  # hidden size of each expert; null = model.mlp_dim
    # An always-on shared expert of this hidden size (0 = none; DeepSeek's n shared experts of size f
    # are one of n * f), optionally scaled by a sigmoid gate of the token (Qwen2-MoE).
    shared_mlp_dim: int = 0
    shared_gate: bool = False
    # softmax_topk: weights are the full softmax's top-k probabilities (Qwen2-MoE, norm_topk_prob=false).
    # topk_softmax: softmax over the k chosen logits, i.e. renormalised to sum 1 (Mixtral).
    router: Literal["softmax_topk", "topk_softmax"] = "topk_softmax"
    # dropless: every token reaches its experts (sorted tokens, grouped matmul). capacity: each expert
    # takes at most capacity_factor * tokens * k / num_experts tokens of a sequence; the rest are dropped.
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01  # Switch load-balancing loss (1.0 when perfectly balanced)
    z_loss_weight: float = 0.001  # router z-loss: mean logsumexp(router logits)^2 (ST-MoE)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (docs/lora.md) on the dense projections whose path matches `targets`: y = x W +
    scale * dropout(x) A B, with A [in, rank], B [rank, out], B starting at zero. Only adapters train (and a
    reward model's fresh `score` head)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # A regular expression searched in each projection's path, e.g. "layers/attn/q", "layers/mlp/down".
    targets: str = "attn/(q|k|v|o)$"
    rslora: bool = False  # scale = alpha / sqrt(rank) (rank-stabilised) instead of alpha / rank


@dataclass(frozen=True)
class QuantConfig:
    """The frozen base's projection kernels stored quantised and dequantised in the matmul (QLoRA).

    nf4: 4-bit NormalFloat codes with one absmax scale per `block_size` inputs of each output;
    double_quant stores those scales as int8 too. int8: symmetric, one scale per output channel."""

    kind: Literal["nf4", "int8"] = "nf4"
    block_size: int = 64
    double_quant: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """One transformer with switches that pick each family's parts (see configs/ for the families):
    decoder-only (LLaMA, Mistral, Qwen2, GPT-2, BLOOM), encoder (BERT, RoBERTa, ALBERT, ELECTRA),
    encoder-decoder (T5, BART).

    Frozen (hashable): modules keep it as static data."""

    arch: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    family: Optional[str] = None  # the Hugging Face model_type this mirrors (llama, gpt2, bert, t5, ...)
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 8  # encoder-decoder: encoder layers
    num_decoder_layers: Optional[int] = None  # encoder-decoder: decoder layers (None = num_layers)
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # None = num_heads (MHA); 1 = MQA; else GQA
    head_dim: Optional[int] = None  # None = d_model // num_heads
    mlp_dim: int = 1408
    max_seq_len: int = 2048
    # silu-gated (LLaMA), gelu_tanh-gated (T5 v1.1), gelu_tanh (GPT-2, BLOOM), erf gelu (BERT, BART), relu
    mlp: Literal["swiglu", "geglu", "gelu", "gelu_exact", "relu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"  # post: x = norm(x + f(x)) (BERT, BART); no final norm
    positions: Literal["rope", "learned", "alibi", "relative", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    relative_buckets: int = 32  # T5 relative position buckets
    relative_max_distance: int = 128
    sliding_window: Optional[int] = None  # attend to at most this many previous tokens (incl. self)
    scale_attention: bool = True  # q.k / sqrt(head_dim); T5 folds the scale into its initialisation
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2, GPT-2, BERT)
    output_bias: bool = False  # biases on the attention output and MLP projections (GPT-2, BERT)
    embed_dim: Optional[int] = None  # factorised embeddings (ALBERT, ELECTRA): size E, projected to d_model
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BLOOM, BART)
    embed_scale: bool = False  # embeddings times sqrt(d_model) (BART's scale_embedding)
    type_vocab_size: int = 0  # token-type (sentence A/B) embeddings (BERT)
    share_layers: bool = False  # one layer's weights applied num_layers times (ALBERT)
    # Encoder heads: BERT's masked LM, ELECTRA's discriminator, or none (hidden states, e.g. embeddings).
    # Decoders: lm (next-token logits) or reward: a scalar per position from a bias-free D -> 1 `score`
    # (Hugging Face's *ForSequenceClassification, num_labels=1); a sequence's reward is read at its last
    # token (docs/post-training.md, Reward models). With train.init_from of an LM, the head starts fresh.
    head: Literal["lm", "mlm", "discriminator", "none", "reward"] = "lm"
    electra_generator: Optional[ElectraGenerator] = None  # with head=discriminator: ELECTRA pre-training
    tie_embeddings: bool = False
    logits_bias: bool = False  # a bias on the output logits (BERT's MLM decoder, BART's final_logits_bias)
    scale_decoder_output: bool = False  # T5 v1.0: hidden * d_model**-0.5 before the output projection
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "dots", "dots_with_no_batch_dims", "full"] = "none"
    attention_impl: Literal["auto", "xla", "cudnn"] = "auto"
    moe: Optional[MoEConfig] = None  # mixture-of-experts MLPs (decoders)
    # Policies applied to the built model (docs/lora.md): adapters on chosen projections, and the
    # frozen base stored quantised. With train.init_from they apply to the checkpoint's model.
    lora: Optional[LoraConfig] = None
    quant: Optional[QuantConfig] = None
    # PPO's value model on the policy's backbone (TRL's AutoModelForCausalLMWithValueHead): a D -> 1 linear
    # `value_head` (kernel and bias) on the final hidden state, Decoder.values; trained in full under LoRA,
    # fresh when train.init_from holds an LM; exported apart (docs/post-training.md, Online RL: losses).
    value_head: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def embedding_dim(self) -> int:
        return self.embed_dim or self.d_model

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers


@dataclass
class MeshConfig:
    """Device mesh. Sizes multiply to the device count; one size may be -1 for "the rest".

    `data`, `fsdp` and `tensor` shape the devices of one slice (one ICI domain: a TPU pod slice, or
    one GPU node). `dcn_data` > 1 makes a hybrid mesh: that many slices (TPU multi-slice) or
    processes (GPU nodes) side by side, data-parallel across the slower data-centre network. The
    mesh axis `data` then has size dcn_data * data, slices outermost.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1  # expert parallelism: experts split over this axis, which also splits the batch
    dcn_data: int = 1  # slices (TPU) or nodes side by side over the data-centre network, data-parallel
    # Extra or replacement logical-axis rules: [[logical_name, mesh_axis or [axes] or null], ...].
    rules: list[list[Any]] = field(default_factory=list)


@dataclass
class DistributedConfig:
    """How the processes of a multi-host run find each other (`jaxllm.distributed`).

    `auto`: an explicit coordinator when one is given (here or in JAXLLM_COORDINATOR), else Slurm
    when run under `srun` with several tasks, else the TPU pod environment; one process does nothing.
    Each field left null is read from its environment variable: JAXLLM_COORDINATOR,
    JAXLLM_NUM_PROCESSES, JAXLLM_PROCESS_ID (what `launch/multihost_local.py` sets).
    """

    mode: Literal["auto", "off", "coordinator", "slurm", "tpu"] = "auto"
    coordinator: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    timeout_s: int = 300  # how long a process waits for the others to join
    # A process silent for this long is taken for dead: the others stop (with JAX's "another task
    # died" message) instead of waiting forever in a collective; restart the same command to resume.
    heartbeat_timeout_s: int = 100


@dataclass
class SourceConfig:
    """One data source. `path`: a file, a glob, a comma-separated list of them, `builtin:NAME`
    (a corpus shipped with jaxllm), `hf:NAME_OR_DIR` (Hugging Face datasets, streamed) or
    `tfds:NAME` (TensorFlow Datasets data source), or a directory of pre-tokenised ArrayRecord shards written by
    `jaxllm data tokenize` (format arrayrecord; auto when the directory holds a metadata.json)."""

    path: str = "builtin:kjv"
    format: Literal["auto", "text", "jsonl", "parquet", "hf", "tfds", "arrayrecord"] = "auto"
    text_field: str = "text"
    split: str = "train"
    weight: float = 1.0
    # For plain text files: what counts as one document.
    text_unit: Literal["file", "paragraph", "line"] = "paragraph"
    hf_config: Optional[str] = None  # the `name` argument of datasets.load_dataset
    data_dir: Optional[str] = None  # TFDS data_dir


@dataclass
class DenoiserConfig:
    """One denoiser of a UL2 mixture: T5 span corruption with its own span length and density, or a
    prefix LM (the S-denoiser). Its mode token is prepended to the encoder input."""

    kind: Literal["span", "prefix_lm"] = "span"
    mean_span_length: float = 3.0  # span: mean length of a corrupted span, in tokens
    noise_density: float = 0.15  # span: fraction of tokens corrupted
    weight: float = 1.0  # relative probability of choosing this denoiser for an example
    mode_token: str = "[R]"  # the tokenizer's own piece if it has one, else an id above its vocabulary


def _ul2_denoisers() -> list[DenoiserConfig]:
    # UL2's three paradigms: R (regular T5 spans), X (extreme: long spans or dense corruption), S (prefix LM),
    # chosen with equal probability.
    return [
        DenoiserConfig("span", 3.0, 0.15, 1.0, "[R]"),
        DenoiserConfig("span", 32.0, 0.15, 1.0, "[X]"),
        DenoiserConfig("span", 3.0, 0.5, 1.0, "[X]"),
        DenoiserConfig("prefix_lm", weight=1.0, mode_token="[S]"),
    ]


@dataclass
class ObjectiveConfig:
    """The training objective: how the pipeline turns documents into batches and what the loss is
    (docs/objectives.md, docs/post-training.md).

    clm: next-token prediction (decoder). mlm: BERT masking, new masks every epoch (encoder; also the
    ELECTRA generator's batch). span: T5 span corruption. bart: BART text infilling + sentence
    permutation. ul2: a mixture of denoisers. span, bart and ul2 are encoder-decoder objectives.
    sft: supervised fine-tuning on conversations / prompt-completion / text records (decoder).
    distill: a decoder learns a teacher's next-token distributions (the `distill:` section).
    dpo, kto, orpo, simpo: preference optimisation (the `preference:` section); reward: a reward model."""

    name: Literal["clm", "mlm", "span", "bart", "ul2", "sft", "distill", "dpo", "kto", "orpo", "simpo", "reward",
                  "grpo", "ppo", "rloo"] = "clm"
    # mlm: the fraction of tokens selected for prediction, and what a selected token becomes:
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8  # the mask token
    random_token_prob: float = 0.1  # a random ordinary token; the rest (0.1) stays as it is
    # span (T5): fraction of tokens corrupted and the mean length of a corrupted span.
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    # Encoder-decoder lengths. encoder_len: null = data.seq_len. decoder_len: null = the longest target
    # the objective makes from a chunk that fills the encoder (span: T5's random_spans_helper, 114 for
    # 512); bart, ul2: the encoder length. Documents are cut into chunks that always fit both.
    encoder_len: Optional[int] = None
    decoder_len: Optional[int] = None
    # First decoder input of each example; null = the objective's own (span, ul2: pad as T5; bart: EOS).
    decoder_start_id: Optional[int] = None
    # bart: span lengths ~ Poisson(poisson_lambda) covering mask_ratio of the tokens, each span one mask
    # token; permute_sentences shuffles the sentences (lines, or text ending in . ! ?) first.
    poisson_lambda: float = 3.0
    mask_ratio: float = 0.3
    permute_sentences: bool = True
    # ul2: the mixture; each example gets one denoiser, chosen by weight.
    denoisers: list[DenoiserConfig] = field(default_factory=_ul2_denoisers)
    # sft (docs/post-training.md). Records: `messages` (a list of {role, content}), `prompt` + `completion`
    # (strings, or lists of messages), or plain `text` (the source's text_field), TRL's dataset formats.
    # chat_template: builtin:NAME, a .jinja file or a Hugging Face tokenizer directory; null = the tokenizer's
    # own (a Hugging Face directory's, or the one a run was trained with), else none (plain formats only).
    chat_template: Optional[str] = None
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    train_on_all: bool = False  # loss on every token, not only the assistant's / the completion's
    packing: bool = True  # several examples per row (first fit, never split; segment ids keep them apart)
    overlong: Literal["truncate", "drop"] = "truncate"  # examples longer than data.seq_len + 1 tokens
    # Preference records (dpo, orpo, simpo, reward: prompt + chosen + rejected; kto: prompt + completion + label),
    # TRL's formats; docs/post-training.md. The prompt field (prompt_field) may be absent from pairs: the
    # shared beginning of chosen and rejected is the prompt.
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    label_field: str = "label"
    # dpo: the records carry the reference model's log-probs (TRL's ref_chosen_logps / ref_rejected_logps;
    # `jaxllm data ref-logps` writes them): no reference model is loaded.
    precomputed_reference: bool = False
    # reward (docs/post-training.md, Reward models): Bradley-Terry -logsigmoid(r_chosen - r_rejected - margin), the
    # margin a record's `margin` field (0 without); plus this coefficient * mean((r_chosen + r_rejected)^2) to keep
    # rewards centred on 0 (TRL's RewardConfig.center_rewards_coefficient; null = none).
    center_rewards_coefficient: Optional[float] = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 256
    shuffle_window: int = 1024  # documents shuffled within windows of this many; 0 = no shuffle
    seed: int = 0
    # BOS/EOS around each document, for clm and mlm; span, bart and ul2 frame examples as their papers do.
    add_bos: bool = True
    add_eos: bool = True
    on_bad_record: Literal["skip", "error"] = "skip"
    prefetch: int = 4  # batches prepared ahead by a background thread; 0 = none
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass
class EvalConfig:
    """Held-out loss and perplexity, logged as eval_loss / eval_ppl over all sources; with several sources
    each one's loss also as eval_loss/PATH (e.g. the domain and the general held-out set when adapting);
    and harness tasks' metrics (`tasks`)."""

    sources: list[SourceConfig] = field(default_factory=list)  # empty = no held-out loss
    every: int = 0  # steps between evaluations; 0 = only at the end of training
    batches: int = 0  # batches per evaluation of each source; 0 = the whole held-out set once
    at_start: bool = False  # also evaluate before the first step (logged at step 0): a fine-tune's starting point
    # lm-evaluation-harness tasks (or groups) run on the live parameters at each evaluation, logged as
    # eval/TASK/METRIC (docs/evaluation.md); needs `pip install -e .[eval]` and a decoder model.
    tasks: list[str] = field(default_factory=list)
    tasks_limit: Optional[float] = 100  # examples per task (below 1: a fraction); null = all
    tasks_num_fewshot: Optional[int] = None  # few-shot examples; null = each task's own default
    include_path: Optional[str] = None  # a directory of your own task YAML files


@dataclass
class TokenizerConfig:
    # A SentencePiece .model file, a Hugging Face tokenizer directory, or `builtin:NAME`.
    # null: the tokenizer of train.init_from's checkpoint when it has one, else builtin:kjv-sp4k.
    path: Optional[str] = None
    # Tokens to add as special tokens (one id each wherever they appear in a text, dropped by decode), e.g.
    # ["<|im_start|>", "<|im_end|>"]; those the tokenizer has are skipped. New ids follow its last one; with
    # train.init_from the model's vocabulary grows to fit (docs/post-training.md), else model.vocab_size must.
    add_special_tokens: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor", "lion"] = "adamw"
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0  # global-norm clipping; null = off


@dataclass(frozen=True)
class AdversarialConfig:
    """Adversarial training on the token embeddings (docs/post-training.md): loss = clean + weight * the loss at
    embeddings moved uphill by delta, ||delta|| <= epsilon (L2 over each row). fgm (Miyato et al.): delta =
    epsilon * g / ||g||, 2 forward+backward passes a step; pgd (FreeLB-style): `steps` normalised ascent steps of
    `step_size` projected to the ball, their losses averaged, steps + 1 passes."""

    method: Literal["fgm", "pgd"] = "fgm"
    epsilon: float = 1.0
    steps: int = 3  # pgd only
    step_size: Optional[float] = None  # pgd only; null = epsilon / steps
    weight: float = 1.0


@dataclass
class TrainConfig:
    # A run directory or checkpoint (ours, or converted from Hugging Face), or a Hugging Face model directory
    # (config.json + safetensors), whose parameters start this run; the optimizer starts fresh. The model architecture is then the checkpoint's: only
    # model.dtype, model.remat, model.attention_impl and model.value_head of this config apply.
    init_from: Optional[str] = None
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    log_every: int = 10
    seed: int = 0
    z_loss: float = 0.0  # weight of log(Z)^2 regulariser on the softmax normaliser
    # Cross-entropy over this many sequence positions at a time (logits recomputed in the backward pass),
    # so [batch, seq, vocab] logits never exist whole; 0 = all at once.
    loss_chunk: int = 512
    sample_prompt: Optional[str] = "And God said"  # printed sample at the end of training; null = none
    sample_tokens: int = 40
    progress_bar: bool = True
    # A NaN/Inf loss or gradient never updates the parameters; then `stop` (with the step and the batch's
    # data position, to replay it) or `skip` the update, count it and go on.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    spike_threshold: float = 6.0  # warn when a loss exceeds mean + threshold * std of the last window; 0 = off
    spike_window: int = 100  # losses that window holds
    # NEFTune (transformers' neftune_noise_alpha): uniform noise of magnitude alpha / sqrt(length * dim) on the
    # token embeddings in training steps only; 0 = off (the paper: 5, 10, 15).
    neftune_noise_alpha: float = 0.0
    adversarial: Optional[AdversarialConfig] = None  # adversarial embedding perturbation (FGM / PGD); null = off


@dataclass
class CheckpointConfig:
    every: int = 200  # steps between saves; a final save always happens
    keep: int = 3  # newest checkpoints kept
    keep_every: Optional[int] = None  # also keep every checkpoint whose step divides by this
    async_save: bool = True
    # A checkpoint failing its checksums at resume: stop with an error, or set it aside and use the one before.
    on_corrupt: Literal["error", "previous"] = "error"


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    # Decoding options (docs/evaluation.md#decoding), defined as transformers' generate's.
    num_beams: int = 1  # > 1: beam search (needs temperature 0)
    length_penalty: float = 1.0  # beam score = sum of log-probs / new_tokens ** length_penalty
    early_stopping: Any = False  # beam search: true | false | "never"
    num_return_sequences: int = 1  # sequences per prompt: the n best beams, or n samples
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the text
    no_repeat_ngram_size: int = 0  # 0 = off; n: no n-gram occurs twice
    min_new_tokens: int = 0  # EOS (and the other stop ids) banned before this many new tokens
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these strings


@dataclass
class DistillConfig:
    """Knowledge distillation (data.objective.name=distill; docs/post-training.md). The divergence between
    the student's and the teacher's next-token distributions at `temperature`, named as TRL's GKD /
    DistillationTrainer: beta=0 forward KL(teacher || student), beta=1 reverse KL(student || teacher), in
    between the generalised Jensen-Shannon divergence with mixture (1 - beta) * student + beta * teacher."""

    teacher: Optional[str] = None  # a jaxllm run directory or checkpoint, or a Hugging Face model directory
    teacher_dtype: Optional[Literal["float32", "bfloat16"]] = None  # store the teacher in it; null = as saved
    beta: float = 0.5
    temperature: float = 1.0  # both distributions are softened by it (no T^2 factor, as TRL)
    alpha: float = 0.0  # loss = (1 - alpha) * divergence + alpha * cross-entropy on the data's tokens
    # Leading vocabulary ids compared (both models' logits are cut to them, so differently padded
    # vocabularies compare over the real tokens); null = the tokenizer's ids, set at startup.
    vocab: Optional[int] = None


@dataclass
class PreferenceConfig:
    """Preference optimisation (data.objective.name: dpo, kto, orpo, simpo; docs/post-training.md), with TRL's
    names and defaults (DPOConfig, KTOConfig, ORPOConfig, CPOConfig with loss_type=simpo)."""

    # DPO and KTO: the strength of the KL penalty to the reference; ORPO: the odds-ratio weight (lambda);
    # SimPO: the reward scale (its paper uses 2 to 10).
    beta: float = 0.1
    # dpo: sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO, with label_smoothing), and TRL's others (exo_pair,
    # nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm; docs/post-training.md); sigmoid
    # with label_smoothing > 0 is conservative DPO (cDPO).
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                       "apo_down", "discopop", "sigmoid_norm"] = "sigmoid"
    label_smoothing: float = 0.0  # dpo: the assumed share of flipped labels; simpo: as in TRL's CPO
    # dpo, kto: the frozen reference. null: the model training starts from (train.init_from), or, with
    # model.lora, the same weights with the adapters switched off (no second copy).
    reference: Optional[str] = None
    reference_dtype: Optional[Literal["float32", "bfloat16"]] = None  # store the reference in it; null = as saved
    desirable_weight: float = 1.0  # kto: weights of the desirable and the undesirable examples' losses
    undesirable_weight: float = 1.0
    simpo_gamma: float = 0.5  # simpo: the target reward margin (TRL's simpo_gamma)
    cpo_alpha: float = 0.0  # simpo: weight of the chosen responses' cross-entropy added to the loss (TRL's cpo_alpha)


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=lambda: RLConfig())


# ----------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class RewardSpec:
    """One reward of online RL (an entry of the list rl.rewards; docs/post-training.md "Online RL: rewards")."""

    # exact_match | numeric | format | length | reward_model | judge, or "module:function" /
    # "path/to/file.py:function": f(prompts, completions, **fields) -> list[float | None] (TRL's signature)
    function: str = "exact_match"
    weight: float = 1.0  # the total reward is the sum of weight * reward over the functions that scored a sample
    args: Any = field(default_factory=dict)  # keyword arguments of the function (e.g. format's pattern)
    name: Optional[str] = None  # the name in the metrics rewards/NAME/mean; null = the function's name


@dataclass
class BestOfNConfig:
    """Rejection-sampling fine-tuning (rl.algorithm: best_of_n; docs/post-training.md, "Online RL: best-of-n"):
    each round samples rl.num_generations completions of each of `prompts_per_round` prompts (rotating through
    data.sources) from the current model, scores them with rl.rewards, keeps the best per prompt (or all at or
    above `threshold`) and fine-tunes on them with the sft objective for `sft_steps` steps."""

    rounds: int = 3
    prompts_per_round: int = 256
    keep: Literal["best", "threshold"] = "best"  # best: each prompt's top completion (ties: the first sampled)
    threshold: Optional[float] = None  # keep=threshold: every completion whose reward is >= this (needed then)
    min_reward: Optional[float] = None  # drop a prompt whose best reward is below this; null = keep every prompt
    sft_steps: int = 100  # train steps of each round's fine-tune (a fresh run from the previous round's model)
    sample_batch_size: Optional[int] = None  # completions per sampling call; null = train.batch_size


@dataclass
class RLConfig:
    """Online reinforcement learning (data.objective.name: grpo | rloo | ppo; docs/post-training.md, "Online RL:
    PPO, GRPO, RLOO"): the trainer samples completions of the data's prompts from the live policy, scores them with
    `rewards`, and trains on them. TRL's names and defaults (GRPOConfig, RLOOConfig, PPOConfig) where TRL has the
    option. One rollout = train.batch_size * minibatches completions (batch_size / num_generations prompts per
    update); `epochs` passes over it, each in `minibatches` optimizer updates (train steps)."""

    rewards: list[RewardSpec] = field(default_factory=list)  # the reward functions (jaxllm.rl.rewards), summed by weight
    num_generations: int = 8  # completions per prompt (a group); train.batch_size must divide by it
    max_new_tokens: int = 256  # TRL's max_completion_length; prompt + completion must fit data.seq_len
    temperature: float = 1.0  # sampling; the training log-probs use logits / temperature too (as TRL)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    minibatches: int = 1  # optimizer updates per pass over a rollout (TRL's steps_per_generation; PPO's
    epochs: int = 1  # passes over a rollout (TRL's num_iterations; PPO's num_ppo_epochs)      num_mini_batches)
    # grpo / rloo: KL coefficient to the reference (grpo: k3 in the loss; rloo: k1 summed in the reward); 0 = no
    # reference model is loaded. The reference: preference.reference, else train.init_from frozen, else with
    # model.lora the adapters switched off. null = TRL's default: grpo 0.0, rloo 0.05.
    beta: Optional[float] = None
    epsilon: float = 0.2  # clip range (lower; and upper unless epsilon_high)
    epsilon_high: Optional[float] = None  # DAPO's clip-higher (e.g. 0.28); null = epsilon
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"  # grpo: how token losses are averaged (TRL's)
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token"  # grpo: sequence = GSPO,
    # sequence_token = GSPO-token (the sequence's ratio, each token's gradient; not in TRL)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # grpo: advantage / std; none = Dr. GRPO
    mask_truncated_completions: bool = False  # completions without a stop token train nothing (DAPO)
    dynamic_sampling: bool = False  # grpo/rloo: drop groups whose rewards are all equal and sample more (DAPO)
    max_rollout_tries: int = 4  # dynamic_sampling: rollouts tried per buffer before training on what was kept
    normalize_advantages: bool = False  # rloo: advantages to mean 0, std 1 over the rollout (TRL's)
    # The update's forward pass runs each prompt once for its num_generations completions (they attend to its
    # keys and values; the gradient flows through it once) instead of once per completion; minibatches then hold
    # whole groups. false: one row per completion, prompt included (fused attention kernels, long prompts).
    shared_prefix: bool = True
    # Held-out evaluation (eval.sources of prompts): eval_reward is greedy; eval_samples = k > 0 also samples k
    # completions per prompt as the rollouts do and logs their mean reward as eval_reward_sampled (TRL's eval).
    eval_samples: int = 0
    # ppo (TRL's PPOConfig): per-token reward -kl_coef * KL(k1) + the score at the last token; GAE(gamma, lam);
    # whitened advantages; value loss vf_coef * clipped (cliprange_value) squared error. kl_target: adaptive
    # coefficient (Ziegler et al.) aiming at this KL per sequence over kl_horizon samples; null = fixed.
    kl_coef: float = 0.05
    kl_target: Optional[float] = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    whiten_rewards: bool = False
    # PPO-ptx (InstructGPT): the objective adds ptx_coef * the clm loss of train.batch_size rows of ptx_sources
    # (text documents, read as clm rows of data.seq_len by the ordinary data pipeline) per update; 0 = off.
    # InstructGPT used it with ppo; grpo and rloo take it too. Logged as ptx_loss (OpenRLHF's names).
    ptx_coef: float = 0.0
    ptx_sources: list[SourceConfig] = field(default_factory=list)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)  # rl.algorithm: best_of_n
    # ppo | grpo | rloo: the same as data.objective.name; best_of_n: rounds of sampling and sft (BestOfNConfig);
    # null = data.objective.name decides
    algorithm: Optional[Literal["ppo", "grpo", "rloo", "best_of_n"]] = None
