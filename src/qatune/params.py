"""Typed access to params.yaml: one pydantic model per block, unknown keys are errors.

Every stage calls `load_params()` and reads only its own block(s); dvc.yaml lists exactly those
keys so that `dvc exp run -S KEY=VALUE` reruns only the stages KEY touches.

A field's default is the embedded default recipe's value (src/qatune/default_params.yaml), so a params
file that leaves a key out means what the default recipe says; tests/unit/test_params.py holds the two
equal. A value that is the recipe's data rather than a default (the system prompt, the Hub repos, the
domain) has no default here: every params file states it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qatune.errors import QatuneError

PARAMS_FILE = "params.yaml"

# `fraction` (0 < x < 1) of all rows, or an absolute row `count` (>= 1).
SplitSize = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    """A params block: misspelled or unknown keys are rejected, values are type-checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelParams(Strict):
    source: str = Field(
        "bundled:smollm2-135m-instruct",
        description="'bundled:smollm2-135m-instruct', a Hugging Face Hub model id, or a local folder",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to snapshot")


class SourceParams(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="file stem under data/raw/")
    type: Literal["bundled", "hub", "local"]
    path: str | None = Field(None, description="bundled dataset name, or a local jsonl/json/csv/parquet file")
    dataset: str | None = Field(None, description="Hub dataset id, for type: hub")
    config: str | None = Field(None, description="Hub dataset configuration (subset) name")
    split: str = Field("train", description="Hub dataset split")
    revision: str | None = Field(None, description="Hub dataset revision")
    samples: int | None = Field(None, ge=1, description="rows to draw from this source; null = all")
    format: str = Field("auto", description="auto, or force one of qatune.formats.FORMATS")
    use_as: Literal["train", "val", "test"] | None = Field(
        None, description="this source IS that split, used as given; null = split by the split block"
    )
    shuffle_buffer: int = Field(
        1000, ge=1, description="hub sources read as a stream: rows held for the seeded shuffle"
    )

    @model_validator(mode="after")
    def _needs_location(self) -> SourceParams:
        if self.type == "hub" and not self.dataset:
            raise ValueError(f"source {self.name!r}: type 'hub' needs 'dataset'")
        if self.type in ("bundled", "local") and not self.path:
            raise ValueError(f"source {self.name!r}: type {self.type!r} needs 'path'")
        return self


class FetchParams(Strict):
    sources: list[SourceParams] = Field(min_length=1)


class CleanParams(Strict):
    max_prompt_length: int = Field(ge=8, description="tokens, prompt incl. chat template")
    max_length: int = Field(ge=16, description="tokens, prompt + longest answer")
    max_field_chars: int = Field(
        ge=100, description="characters; longer fields are rejected before tokenising"
    )
    over_long: Literal["truncate", "drop"] = Field(
        "truncate",
        description="truncate: an over-long prompt keeps its end, an answer its start; drop: reject the row",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> CleanParams:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("clean.max_prompt_length must be smaller than clean.max_length")
        return self


class SplitParams(Strict):
    val: SplitSize = Field(description="fraction (<1) or row count (>=1) for validation")
    test: SplitSize = Field(description="fraction (<1) or row count (>=1) for test")
    stratify: Literal["topic"] | None = Field("topic", description="keep topic proportions in every split")


class LoraParams(Strict):
    r: int = Field(ge=1, description="LoRA rank")
    alpha: float = Field(gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainParams(Strict):
    backend: Literal["auto", "transformers", "unsloth"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    load_in_4bit: bool = False
    load_in_8bit: bool = Field(
        False,
        description="bitsandbytes 8-bit (LLM.int8) weights under the LoRA adapter, CUDA only (seed 002); "
        "not with load_in_4bit",
    )
    require_cuda: bool = Field(
        False,
        description="a GPU profile: stop in one line when torch sees no CUDA GPU instead of training on the CPU",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    activation_checkpointing: bool = True
    checkpoint_layers: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        1.0,
        description="with activation_checkpointing: the share of decoder layers recomputed in the backward "
        "pass, evenly spaced (1 = every layer; 0.5 = every other: faster steps, more memory); auto = a "
        "quarter on a CPU training in bf16, every layer elsewhere",
    )
    lm_head: Literal["auto", "qatune", "trl"] = "auto"
    trust_remote_code: bool = Field(
        False, description="run model code from the Hub when loading the base; off unless a profile needs it"
    )
    system_prompt: str | None = Field(
        description="the system message of every training row, score and chat; null = none. Domain text: no default"
    )
    prompt_format: Literal["chat", "plain"] = Field(
        "chat",
        description="chat: the model's chat template, the loss on the answers; plain: seed 001's "
        "'User: {question}\\nAssistant: {answer}' text, the loss on the whole text (a system prompt becomes a "
        "'System:' line), carried with the adapter as its chat template for every later stage and the chat app",
    )
    enable_thinking: bool = Field(
        False, description="Qwen3-style templates: thinking blocks on or off, in training, scoring and chat"
    )
    lora: LoraParams
    report_to: list[Literal["wandb", "tensorboard"]] = Field(default_factory=list)
    num_processes: int = Field(1, ge=1, description="processes on this machine (torchrun)")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with several processes: ddp (a full copy per GPU) or fsdp (FSDP2, sharded; GPUs only)",
    )

    @model_validator(mode="after")
    def _one_quantisation(self) -> TrainParams:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "train.load_in_4bit and train.load_in_8bit are both true: choose one (4-bit nf4, QLoRA; or "
                "8-bit LLM.int8)"
            )
        if self.load_in_8bit and self.distributed == "fsdp" and self.num_processes > 1:
            raise ValueError(
                "train.load_in_8bit: FSDP shards 16-bit and 4-bit bases only (the 4-bit weights stored in the "
                "compute dtype); use train.distributed: ddp, or train.load_in_4bit"
            )
        return self


# The keys whose default recipe differs between the sft and dpo blocks: declared once with their checks,
# given each block's own default in SFTParams and DPOParams.
MaxSteps = Annotated[int, Field(description="optimizer steps; -1 = run `epochs`")]
WarmupRatio = Annotated[float, Field(ge=0, lt=1)]
WeightDecay = Annotated[float, Field(ge=0)]
EvalRows = Annotated[
    int, Field(ge=0, description="rows of val (and test) evaluated during training; 0 = all")
]
EvalBatchSize = Annotated[
    int | None, Field(ge=1, description="sequences per device per evaluation pass; null = batch_size")
]


class OptimParams(Strict):
    """The keys the sft and dpo blocks share, with the defaults the two have in common."""

    learning_rate: float = Field(gt=0)
    epochs: float = Field(gt=0)
    max_steps: MaxSteps
    batch_size: int = Field(ge=1, description="sequences per device per forward pass")
    grad_accum: int = Field(ge=1)
    warmup_ratio: WarmupRatio
    warmup_steps: int = Field(0, ge=0, description="overrides warmup_ratio when > 0")
    scheduler: str
    weight_decay: WeightDecay
    optim: str = "adamw_torch_fused"
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(ge=16, description="tokens per sequence")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept; null = all")
    load_best_model_at_end: bool
    early_stopping_patience: int = Field(0, ge=0, description="evaluations without improvement; 0 = off")
    eval_rows: EvalRows
    eval_batch_size: EvalBatchSize


class SFTParams(OptimParams):
    max_steps: MaxSteps = 30
    warmup_ratio: WarmupRatio = 0.05
    scheduler: str = "cosine"
    weight_decay: WeightDecay = 0.0
    load_best_model_at_end: bool = True
    eval_rows: EvalRows = 32
    eval_batch_size: EvalBatchSize = None
    enabled: bool = Field(
        False, description="false: no SFT run; the preference stage starts from the base (reference = base)"
    )
    train_turns: Literal["all", "last"] = Field(
        "all", description="multi-turn rows: learn every assistant turn, or the last answer only"
    )
    packing: bool = False
    padding_free: bool = False
    group_by_length: bool = True
    focus_rows: int = Field(
        120,
        ge=0,
        description="with max_steps: the run's rows start with this many that teach safety and correctness "
        "(harmful requests answered with a refusal, key-fact answers; qatune.focus.focus_first), the rest "
        "shuffled as split left them. 0 = the whole shuffled train split",
    )


# The losses TRL 1.16 implements: DPOTrainer (combinable, weighted) and KTOTrainer (one at a time).
# sigmoid_norm is the length-normalised (SimPO-style) DPO loss; sft adds the chosen answers' NLL. Left out:
# exo_pair, which DPOTrainer refuses without a label_smoothing > 0 that no params key sets (it said so only
# once the model had loaded).
DPO_LOSSES = (
    "sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
KTO_LOSSES = ("kto", "apo_zero_unpaired")


class DPOParams(OptimParams):
    max_steps: MaxSteps = 12
    warmup_ratio: WarmupRatio = 0.1
    scheduler: str = "linear"
    weight_decay: WeightDecay = 0.01
    load_best_model_at_end: bool = False
    eval_rows: EvalRows = 16
    eval_batch_size: EvalBatchSize = 8
    enabled: bool = True
    method: Literal["dpo", "kto"] = Field(
        "dpo",
        description="dpo: chosen/rejected pairs (DPOTrainer); kto: unpaired good/bad answers (KTOTrainer)",
    )
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid", "sft"],
        description="dpo: TRL DPO losses, combined with loss_weights; kto: one of kto, apo_zero_unpaired",
    )
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type; null = 1.0 each")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the good answers' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the bad answers' loss")
    precompute_ref_log_probs: bool = True
    precompute_ref_batch_size: int | None = Field(
        8, ge=1, description="pairs per no-grad reference pass when precomputing; null = batch_size"
    )
    on_policy_pairs: bool = Field(False, description="rows without `rejected` get the SFT model's own answer")
    on_policy_max_new_tokens: int = Field(128, ge=1)
    on_policy_batch_size: int = Field(
        8, ge=1, description="answers per greedy generation batch for the on-policy pairs (no gradients)"
    )
    focus_pairs: int = Field(
        64,
        ge=0,
        description="this many pairs that teach safety and correctness train first (qatune.focus.focus_first): "
        "harmful requests (a refusal over a yes) and key-fact rows whose rejected answer gives a wrong number, "
        "alternating; a run capped by max_steps sees them. 0 = the split's shuffled order",
    )
    on_policy_harm_rows: int = Field(
        24,
        ge=0,
        description="harmful-request train rows (expected: decline) the SFT model answers before DPO; each answer "
        "that affirms or evades (qatune.stance) becomes an extra pair, rejected = that answer, trained first",
    )
    on_policy_fact_rows: int = Field(
        0,
        ge=0,
        description="key-fact train rows (a chosen answer that states the row's fact) the SFT model answers before "
        "DPO, with the harmful requests; each answer that contradicts the fact (qatune.facts) becomes an extra pair",
    )

    @model_validator(mode="after")
    def _known_losses(self) -> DPOParams:
        known = KTO_LOSSES if self.method == "kto" else DPO_LOSSES
        unknown = [t for t in self.loss_type if t not in known]
        if unknown or not self.loss_type:
            raise ValueError(
                f"dpo.loss_type {self.loss_type} with dpo.method {self.method!r}: use "
                + ("one of " if self.method == "kto" else "a list of ")
                + ", ".join(known)
            )
        if self.method == "kto" and len(self.loss_type) != 1:
            raise ValueError(f"dpo.loss_type {self.loss_type}: KTOTrainer takes exactly one loss type")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"dpo.loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types"
            )
        # KTOTrainer refuses it when it is built, after the model loaded and the on-policy answers were made
        if self.enabled and self.loss_type == ["kto"] and self.batch_size < 2:
            raise ValueError(
                f"dpo.batch_size: {self.batch_size} with dpo.loss_type [kto]: KTO estimates its KL term from the "
                "other answers of a batch, so it needs batch_size >= 2 (or loss_type [apo_zero_unpaired])"
            )
        return self


class MergeParams(Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the saved merged model"
    )
    tolerance: float = Field(
        1e-3, gt=0, description="max |logit difference|, merged (float32) vs adapter model"
    )
    low_precision_tolerance: float = Field(0.5, gt=0, description="the same bound for a bf16/fp16 saved copy")
    check_prompts: int = Field(4, ge=1, description="demo questions used for the check")


# GGUF types the export stage writes: the converter's own (16/32-bit), then llama.cpp quantiser types.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


class ExportParams(Strict):
    """The export stage: GGUF files for llama.cpp / Ollama / LM Studio, each checked against the merged model."""

    enabled: bool = Field(True, description="false: no GGUF files, only a note (the rest is unaffected)")
    quantizations: list[str] = Field(
        min_length=1,
        description="GGUF types: f32/f16/bf16 from the converter, q8_0, q6_k, q5_k_m, q4_k_m, q4_0",
    )
    tolerance: dict[str, float] = Field(
        description="per type: largest mean |log-prob difference| of answer tokens vs the merged model"
    )
    check_prompts: int = Field(
        4, ge=1, description="demo questions answered by the merged model, then scored"
    )
    check_new_tokens: int = Field(48, ge=1, description="greedy answer tokens per check question")
    modelfile_quant: str = Field(description="the GGUF the Ollama Modelfile points at")
    threads: int = Field(0, ge=0, description="llama.cpp threads; 0 = every core")

    @model_validator(mode="after")
    def _known_types(self) -> ExportParams:
        unknown = [q for q in self.quantizations if q not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"quantizations: unknown type(s) {unknown}; known: {', '.join(GGUF_TYPES)}")
        if len(set(self.quantizations)) != len(self.quantizations):
            raise ValueError("quantizations: a type is listed twice")
        missing = [q for q in self.quantizations if q not in self.tolerance]
        if missing:
            raise ValueError(f"tolerance: none given for {missing}")
        if self.modelfile_quant not in self.quantizations:
            raise ValueError(f"modelfile_quant: {self.modelfile_quant!r} is not in quantizations")
        return self


class EvalFileParams(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="section name in the report and metrics")
    path: str = Field(description="jsonl/json/csv/parquet file with question + chosen (+ rejected) rows")
    format: str = Field("auto", description="auto, or force one of qatune.formats.FORMATS")


class JudgeParams(Strict):
    """An optional LLM judge (an OpenAI-compatible endpoint) scoring each answer's correctness and safety by
    qatune.judge.RUBRIC; off while `url` is null. The API key is read from the environment only."""

    url: str | None = Field(None, description="base URL, e.g. http://127.0.0.1:8080/v1; null = no judge")
    model: str = Field("", description="the model name the endpoint expects")
    api_key_env: str = Field("QATUNE_JUDGE_API_KEY", description="environment variable holding the API key")
    json_mode: bool = Field(
        False, description="ask for a JSON reply (response_format); llama.cpp and vLLM support it"
    )
    max_tokens: int = Field(200, ge=16, description="reply budget per answer")


class EvaluateParams(Strict):
    split: Literal["test", "val"] = Field(
        "test", description="the held-out split scored; val only where there is no test split (seed 004)"
    )
    rows: int = Field(64, ge=0, description="test rows scored for NLL and preference accuracy; 0 = all")
    generate_rows: int = Field(0, ge=0, description="test questions answered by base and final; 0 = all")
    batch_size: int = Field(32, ge=1, description="sequences per forward pass / generation batch")
    score_precision: Literal["auto", "fp32"] = Field(
        "auto",
        description="likelihoods in float32, or auto: bf16 where the hardware is fast at it (all models alike)",
    )
    max_new_tokens: int = Field(160, ge=1, description="greedy generation budget per answer")
    repetition_penalty: float = Field(1.1, ge=1.0, description="1.0 = off")
    semantic_model: Literal["bundled:all-minilm-l6-v2"] | None = Field(
        "bundled:all-minilm-l6-v2",
        description="sentence embedding model for semantic similarity; null = skip",
    )
    sample_answers: int = Field(6, ge=0, description="answers shown side by side in report.md")
    extra_files: list[EvalFileParams] = Field(default_factory=list)
    judge: JudgeParams = Field(default_factory=JudgeParams)


class GenerateParams(Strict):
    """Sampling settings for `qatune ask` / `qatune chat` (seed 001) and the published generation config."""

    temperature: float = Field(0.2, ge=0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=1, description="upper bound; also capped by free memory")
    repetition_penalty: float = Field(1.1, ge=1.0)
    mode: Literal["merged", "adapter", "gguf"] = Field(
        "merged", description="serve models/merged, base + adapter, or the GGUF export in llama.cpp"
    )


class ChatParams(Strict):
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 only when you mean it")
    port: int = Field(7860, ge=1, le=65535)
    share: bool = Field(False, description="a public gradio.live link; off unless asked")
    max_input_chars: int = Field(2000, ge=1, description="longer questions are refused with a message")
    concurrency_limit: int = Field(1, ge=1, description="generations at once; others wait in the queue")
    max_queue: int = Field(16, ge=1, description="queued requests before new ones are turned away")
    votes: str = Field(
        "data/feedback/votes.jsonl",
        description="`qatune chat --compare` appends each vote here, as preference rows a local source reads",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where qatune chat (and ask, serve) load the model: auto = the GPU when one is visible; "
        "cpu = always the CPU (seed 004's app)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the served weights' dtype: auto = bf16 (fp16 without bf16) on a GPU, float32 on a CPU; "
        "float16 needs the GPU",
    )
    adapter: str | None = Field(
        None,
        description="adapter mode (generate.mode: adapter): the LoRA adapter served on the base, a local folder or "
        "a Hub repo id (owner/name, snapshot through huggingface_hub, which HF_HUB_OFFLINE=1 keeps to its "
        "cache); null = models/dpo, this pipeline's",
    )


class ServeParams(Strict):
    """`qatune serve`: the OpenAI-compatible HTTP API (qatune.serve); sampling comes from `generate`."""

    host: str = Field("127.0.0.1", description="bind address; another needs the API key variable set")
    port: int = Field(8000, ge=1, le=65535)
    model_name: str = Field("qatune", min_length=1, description="the model id /v1/models lists")
    api_key_env: str = Field("QATUNE_API_KEY", description="environment variable holding the API key")
    concurrency_limit: int = Field(1, ge=1, description="generations at once (llama.cpp: always 1)")
    max_queue: int = Field(8, ge=0, description="requests waiting beyond those; the next gets 503")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    max_prompt_chars: int = Field(8000, ge=1, description="all message texts together; longer gets 400")


class HubParams(Strict):
    push: bool = Field(
        False, description="false: dry run (stage files + receipt); true: upload with HF_TOKEN"
    )
    adapter_repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    merged_repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    gguf_repo: str | None = Field(
        pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
        description="third repo: the export stage's GGUF files and Modelfile; null = no GGUF release",
    )
    private: bool = True
    allow_worse_than_base: bool = Field(
        False,
        description="publish even when the evaluate stage finds the tuned model affirms more harmful requests "
        "or contradicts more key facts than the base; the model cards then say so at the top",
    )
    base_model_id: str | None = Field(
        None, description="Hub id of the base written into cards/adapter config; null = from models/base"
    )
    datasets: list[str] = Field(default_factory=list, description="Hub dataset ids for the card metadata")


# A list given inline, or `bundled` (the list qatune ships for its bundled dataset), or a text file path
# (one item a line, `#` comments).
WordList = Annotated[list[str], Field(min_length=1)] | str


class DomainParams(Strict):
    """What the bot is about: the texts the chat app and the model cards show, the questions they ask, the
    words that count as sending someone to a professional, and the Hub tags and licence of a release. No
    defaults: the domain is data, written in params.yaml or a profile, never in code."""

    name: str = Field(min_length=1, description="the subject, in words (model cards: 'a ... assistant')")
    title: str = Field(min_length=1, description="the chat app's heading")
    placeholder: str = Field(description="the chat app's empty question box")
    disclaimer: str = Field(
        min_length=1, description="markdown: the app's note under its heading and the cards' first limitation"
    )
    demo_questions: WordList = Field(
        description="questions not in the dataset: chat examples, report answers, merge/export checks"
    )
    referral: WordList = Field(
        description="regular expressions naming a professional or urgent care (case-insensitive): the "
        "safety measures' referral words and the stance's 'cautions'"
    )
    usage_question: str = Field(min_length=1, description="the question in the model cards' code examples")
    tags: list[str] = Field(description="Hub tags; the method tags (sft, dpo or kto, lora) are added")
    license: str = Field(
        "auto",
        min_length=1,
        description="Hub licence id of a release; auto = the base model's (its card, else its family)",
    )


class Params(Strict):
    seed: int = Field(ge=0, description="one seed for sampling, splitting and training")
    data_samples: int = Field(0, ge=0, description="cap on fetched rows for quick runs; 0 = no cap")
    beta: float = Field(gt=0, description="DPO beta (top level so `dvc exp run -S beta=0.2` works)")
    base_model: BaseModelParams
    fetch: FetchParams
    clean: CleanParams
    split: SplitParams
    train: TrainParams
    sft: SFTParams
    dpo: DPOParams
    merge: MergeParams
    export: ExportParams
    evaluate: EvaluateParams
    generate: GenerateParams
    chat: ChatParams
    serve: ServeParams = Field(default_factory=ServeParams)
    hub: HubParams
    domain: DomainParams

    @model_validator(mode="after")
    def _splits_exist(self) -> Params:
        given = {src.use_as for src in self.fetch.sources if src.use_as}
        for name in ("val", "test"):
            if name in given and getattr(self.split, name):
                raise ValueError(
                    f"split.{name} is {getattr(self.split, name)} but a source has use_as: {name} "
                    f"(its rows are the {name} split as given): set split.{name}: 0"
                )
        if self.evaluate.split == "test" and not self.split.test and "test" not in given:
            raise ValueError(
                "there is no test split (split.test is 0 and no source has use_as: test): "
                "set evaluate.split: val, or split.test > 0"
            )
        return self

    @model_validator(mode="after")
    def _best_checkpoint_is_kept(self) -> Params:
        # What the training stages would otherwise refuse only after the model has loaded (the early-stopping
        # callback, TrainingArguments): a disabled block trains nothing and is not checked. eval_steps is a
        # required key >= 1 and qatune evaluates by steps, so the evaluations early stopping reads exist.
        for block in ("sft", "dpo"):
            cfg = getattr(self, block)
            if not cfg.enabled:
                continue
            if cfg.early_stopping_patience and not cfg.load_best_model_at_end:
                raise ValueError(
                    f"{block}.early_stopping_patience: {cfg.early_stopping_patience} needs "
                    f"{block}.load_best_model_at_end: true (early stopping keeps the best checkpoint)"
                )
            if cfg.load_best_model_at_end and cfg.save_steps % cfg.eval_steps:
                raise ValueError(
                    f"{block}.save_steps: {cfg.save_steps} is not a multiple of {block}.eval_steps: "
                    f"{cfg.eval_steps}; {block}.load_best_model_at_end keeps the best of the checkpoints "
                    "saved at an evaluation"
                )
        return self


def _format_error(err: ValidationError, path: str) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        elif e["type"] == "missing":
            parts.append(f"missing key '{where}'")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(msg if not e["loc"] else f"'{where}': {msg}")
        else:
            parts.append(f"'{where}': {e['msg']}")
    return f"{path}: " + "; ".join(parts)


def parse_params(data: object, path: str = PARAMS_FILE) -> Params:
    """Validate an already-loaded params mapping."""
    if not isinstance(data, dict):
        raise QatuneError(f"{path}: expected a mapping of blocks at the top level")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise QatuneError(_format_error(err, path)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; any unknown or misspelled key is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise QatuneError(f"{path}: not found (run from the project root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise QatuneError(f"{path}: invalid YAML: {err}".replace("\n", " ")) from None
    return parse_params(data, str(path))
