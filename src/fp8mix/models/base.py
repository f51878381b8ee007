"""What fp8mix needs to know about a model family: its LM blocks, their linears grouped the way vLLM fuses them,
the parts that always stay BF16, and the names of modules in memory, on disk and in vLLM."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj: a fused group is FP8 or BF16 as a whole.
GROUP_KINDS = ("qkv", "o", "gate_up", "down")
LLAMA_STYLE_GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one LM block that vLLM runs as one layer."""

    name: str                      # e.g. model.language_model.layers.7.self_attn.qkv
    block: int
    kind: str                      # one of GROUP_KINDS
    modules: tuple[str, ...]       # in-memory module names
    shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) per module
    params: int                    # weight elements (bias excluded: it stays BF16 in every format)


@dataclass(frozen=True)
class KeptPart:
    """A part of the model that always stays BF16, and why."""

    name: str
    params: int
    reason: str


@dataclass(frozen=True)
class ModelLayout:
    family: str
    architecture: str
    n_blocks: int
    groups: tuple[LinearGroup, ...]
    kept_bf16: tuple[KeptPart, ...]
    tied_lm_head: bool
    total_params: int
    extra: dict = field(default_factory=dict)

    @property
    def lm_linear_params(self) -> int:
        return sum(g.params for g in self.groups)

    def groups_of_block(self, block: int) -> list[LinearGroup]:
        return [g for g in self.groups if g.block == block]

    def group(self, name: str) -> LinearGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


class FamilyAdapter:
    """Base for one model family. A family subclass names its modules and its on-disk name mapping."""

    family: str = ""
    title: str = ""                # the family's name for people (reports, errors)
    architectures: tuple[str, ...] = ()
    processor_class: str = ""      # transformers' processor class; fp8mix builds it without the video processor
    blocks_path: str = ""          # in-memory path of the decoder blocks' ModuleList
    vision_path: str = ""          # in-memory path of the vision tower ("" if none)
    embed_path: str = ""
    lm_head_path: str = "lm_head"
    group_members: dict[str, tuple[str, ...]] = LLAMA_STYLE_GROUPS
    # (in-memory prefix, on-disk prefix) pairs, most specific first
    disk_prefixes: tuple[tuple[str, str], ...] = ()
    # (on-disk prefix, vLLM prefix) pairs: the module names vLLM's model class uses
    vllm_prefixes: tuple[tuple[str, str], ...] = ()
    # The ignore entry that keeps the vision tower BF16 in vLLM: a regex vLLM does not remap, so it must match
    # vLLM's own names and both HF namings.
    vision_ignore: str = ""

    # ---- names -----------------------------------------------------------------------------------------
    def to_disk(self, name: str) -> str:
        for mem, disk in self.disk_prefixes:
            if name == mem or name.startswith(mem + "."):
                return disk + name[len(mem):]
        return name

    def to_vllm(self, disk_name: str) -> str:
        for disk, vllm in self.vllm_prefixes:
            if disk_name == disk or disk_name.startswith(disk + "."):
                return vllm + disk_name[len(disk):]
        return disk_name

    def to_memory(self, name: str) -> str:
        for mem, disk in self.disk_prefixes:
            if name == disk or name.startswith(disk + "."):
                return mem + name[len(disk):]
        return name

    # ---- structure -------------------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> ModelLayout:
        blocks = model.get_submodule(self.blocks_path)
        groups = []
        for i in range(len(blocks)):
            for kind in GROUP_KINDS:
                names, shapes = [], []
                for member in self.group_members[kind]:
                    full = f"{self.blocks_path}.{i}.{member}"
                    lin = model.get_submodule(full)
                    if not isinstance(lin, nn.Linear):
                        raise TypeError(f"{full} is {type(lin).__name__}, expected nn.Linear")
                    names.append(full)
                    shapes.append((lin.out_features, lin.in_features))
                member0 = self.group_members[kind][0]
                prefix = member0.rsplit(".", 1)[0]
                groups.append(LinearGroup(f"{self.blocks_path}.{i}.{prefix}.{kind}", i, kind, tuple(names),
                                          tuple(shapes), sum(o * k for o, k in shapes)))
        return ModelLayout(self.family, type(model).__name__, len(blocks), tuple(groups), self.kept_parts(model),
                           self.is_tied(model), self.total_params(model))

    def is_tied(self, model: nn.Module) -> bool:
        # From the config: on the meta device every tensor shares data_ptr 0, so pointers prove nothing.
        cfg = model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))

    def total_params(self, model: nn.Module) -> int:
        seen, total = set(), 0
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen or (self.is_tied(model) and name == f"{self.lm_head_path}.weight"):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def kept_parts(self, model: nn.Module) -> tuple[KeptPart, ...]:
        def n(path):
            return sum(p.numel() for p in model.get_submodule(path).parameters())

        parts = []
        if self.vision_path:
            parts.append(KeptPart(self.vision_path, n(self.vision_path), self.vision_reason(model)))
        parts.append(KeptPart(self.embed_path, n(self.embed_path), "embedding lookup: no matrix product to run in FP8"))
        tied = self.is_tied(model)
        parts.append(KeptPart(self.lm_head_path, 0 if tied else n(self.lm_head_path),
                              "tied to the embeddings" if tied else "output head: most sensitive layer, kept BF16"))
        return tuple(parts)

    def vision_reason(self, model: nn.Module) -> str:
        return "vision tower: out of scope (the language model is quantized)"

    def vision_linears(self, model: nn.Module) -> list[str]:
        if not self.vision_path:
            return []
        vis = model.get_submodule(self.vision_path)
        return [f"{self.vision_path}.{n}" for n, m in vis.named_modules() if isinstance(m, nn.Linear)]

    def all_linears(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def plan_facts(self, model: nn.Module) -> dict:
        """What a plan needs from the model besides the scores, recorded beside them so that planning reads run
        files only: every LM linear, its on-disk name, and the ignore entries that keep the vision tower and
        lm_head BF16 in vLLM."""
        linears = self.all_lm_linears(model)
        return {"family": self.title, "architecture": type(model).__name__, "lm_linears": linears, "disk_names": {m: self.to_disk(m) for m in linears},
                "always_ignore": [self.vision_ignore, self.lm_head_path]}

    def all_lm_linears(self, model: nn.Module) -> list[str]:
        """Every nn.Linear inside the decoder blocks, whether or not it is in a group."""
        blocks = model.get_submodule(self.blocks_path)
        return [f"{self.blocks_path}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
