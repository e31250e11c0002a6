"""fastadapter on transformers-native adapters (transformers' ``PeftAdapterMixin``).

A transformers ``PreTrainedModel`` can hold PEFT adapters itself: ``model.add_adapter(LoraConfig)``,
``model.load_adapter(dir)``, ``model.save_pretrained(dir)``. transformers is the oracle here:

- ``fastadapter.save(model, dir)`` writes what ``model.save_pretrained(dir)`` writes (the active adapter,
  at the top level, plus ``generation_config.json`` when the model can generate; no model card, no
  ``config.json``), the same bytes;
- ``fastadapter.load(model, dir)`` leaves a plain transformers model as ``model.load_adapter(dir)`` would
  (PEFT's layer classes, ``peft_config``, the same logits), so that every transformers adapter method
  works on it afterwards.

Models are built twice (builders are deterministic): one twin goes through transformers, the other
through fastadapter, so neither can lean on what the other did to the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

import fastadapter
from helpers import (
    BIN,
    CARD,
    CONFIG,
    SAFETENSORS,
    assert_same_config,
    assert_same_state,
    logits,
    lora_config,
    make_peft,
    model_state,
    perturb_trainable,
    safetensors_keys,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    tree,
)

INPUTS = token_ids()
GENERATION_CONFIG = "generation_config.json"


def seq_cls() -> nn.Module:
    return tiny_llama(cls=LlamaForSequenceClassification, num_labels=3)


# name -> (builder, LoraConfig overrides). transformers' add_adapter does not add the classification
# head to modules_to_save for task_type SEQ_CLS (PEFT's PeftModelForSequenceClassification does), so the
# head is named explicitly.
CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {}),
    "gpt2_conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "seq_cls_modules_to_save": (seq_cls, {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}),
    "lm_head_modules_to_save": (tiny_llama, {"modules_to_save": ["lm_head"]}),
}
OTHER = {"target_modules": ["q_proj", "k_proj"], "r": 2, "lora_alpha": 4}


def native(
    build: Callable[[], nn.Module], overrides: dict[str, Any], *, seed: int = 1, name: str | None = None
) -> Any:
    """A transformers model with a perturbed adapter added by transformers' own `add_adapter`."""
    model = build()
    torch.manual_seed(seed)
    model.add_adapter(lora_config(**overrides), adapter_name=name)
    perturb_trainable(model, seed)
    return model.eval()


def two_adapters(first: str = "a", second: str = "b") -> Any:
    """Two adapters added by transformers (different targets and ranks), each perturbed with its own seed."""
    model = native(tiny_llama, {}, seed=1, name=first)
    torch.manual_seed(2)
    model.add_adapter(lora_config(**OTHER), adapter_name=second)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if f".{second}." in pname:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def assert_same_as_transformers(ours: Path, theirs: Path) -> None:
    assert tree(ours) == tree(theirs)
    assert (ours / SAFETENSORS).read_bytes() == (theirs / SAFETENSORS).read_bytes()
    assert_same_config(ours / CONFIG, theirs / CONFIG)
    if (theirs / GENERATION_CONFIG).exists():
        assert (ours / GENERATION_CONFIG).read_bytes() == (theirs / GENERATION_CONFIG).read_bytes()


# --- 1. fastadapter.save on a transformers host -------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_save_writes_what_transformers_save_pretrained_writes(tmp_path: Path, case: str) -> None:
    build, overrides = CASES[case]
    theirs = native(build, overrides)
    theirs.save_pretrained(str(tmp_path / "transformers"))
    expected = {SAFETENSORS, CONFIG} | ({GENERATION_CONFIG} if theirs.can_generate() else set())
    assert tree(tmp_path / "transformers") == expected
    keys = safetensors_keys(tmp_path / "transformers" / SAFETENSORS)
    assert any(k.endswith("lora_B.weight") for k in keys)
    if "modules_to_save" in overrides:
        head = overrides["modules_to_save"][0]
        assert f"base_model.model.{head}.weight" in keys

    ours = native(build, overrides)
    fastadapter.save(ours, tmp_path / "ours")
    assert_same_as_transformers(tmp_path / "ours", tmp_path / "transformers")


@pytest.mark.parametrize("active", ["a", "b"])
def test_save_writes_only_the_active_adapter_at_the_top_level_whatever_its_name(
    tmp_path: Path, active: str
) -> None:
    theirs = two_adapters()
    theirs.set_adapter(active)
    theirs.save_pretrained(str(tmp_path / "transformers"))
    k_proj = any("k_proj" in k for k in safetensors_keys(tmp_path / "transformers" / SAFETENSORS))
    assert k_proj == (active == "b")  # the oracle did save the active one

    ours = two_adapters()
    ours.set_adapter(active)
    fastadapter.save(ours, tmp_path / "ours")
    assert_same_as_transformers(tmp_path / "ours", tmp_path / "transformers")
    assert ours.active_adapters() == [active]


def test_save_refuses_several_active_adapters_as_transformers_does(tmp_path: Path) -> None:
    theirs = two_adapters()
    theirs.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match=r"[Mm]ultiple active adapters"):
        theirs.save_pretrained(str(tmp_path / "transformers"))

    ours = two_adapters()
    ours.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="active"):
        fastadapter.save(ours, tmp_path / "ours")
    assert not (tmp_path / "ours" / SAFETENSORS).exists()
    assert not (tmp_path / "ours" / CONFIG).exists()


@pytest.mark.parametrize("names", [("a", "b"), ("default", "b")])
def test_selected_adapters_saves_each_listed_adapter_where_peft_would(
    tmp_path: Path, names: tuple[str, str]
) -> None:
    """PEFT's meaning of `selected_adapters`: "default" at the top level, any other in `dir/<name>/`;
    each one's files are what transformers writes for it when it is the active adapter."""
    ours = two_adapters(*names)
    fastadapter.save(ours, tmp_path / "ours", selected_adapters=list(names))
    assert ours.active_adapters() == [names[1]]  # saving does not switch adapters
    for name in names:
        theirs = two_adapters(*names)
        theirs.set_adapter(name)
        theirs.save_pretrained(str(tmp_path / name))
        where = tmp_path / "ours" / ("" if name == "default" else name)
        assert (where / SAFETENSORS).read_bytes() == (tmp_path / name / SAFETENSORS).read_bytes(), name
        assert_same_config(where / CONFIG, tmp_path / name / CONFIG)
    written = tree(tmp_path / "ours")
    assert not any(Path(p).name in (CARD, "config.json") for p in written), written


def test_safe_serialization_false_writes_the_same_tensors_as_a_bin(tmp_path: Path) -> None:
    theirs = native(tiny_llama, {})
    theirs.save_pretrained(str(tmp_path / "transformers"))
    ours = native(tiny_llama, {})
    fastadapter.save(ours, tmp_path / "ours", safe_serialization=False)

    assert tree(tmp_path / "ours") == {
        BIN if f == SAFETENSORS else f for f in tree(tmp_path / "transformers")
    }
    mine = torch.load(tmp_path / "ours" / BIN, weights_only=True)
    expected = load_file(tmp_path / "transformers" / SAFETENSORS)
    assert sorted(mine) == sorted(expected)
    for key, value in expected.items():
        assert mine[key].dtype == value.dtype, key
        assert torch.equal(mine[key], value), key
    assert_same_config(tmp_path / "ours" / CONFIG, tmp_path / "transformers" / CONFIG)


def test_is_main_process_false_writes_no_files(tmp_path: Path) -> None:
    theirs = native(tiny_llama, {})
    theirs.save_pretrained(str(tmp_path / "transformers"), is_main_process=False)
    assert tree(tmp_path / "transformers") == set()

    ours = native(tiny_llama, {})
    fastadapter.save(ours, tmp_path / "ours", is_main_process=False)
    assert not (tmp_path / "ours").exists() or tree(tmp_path / "ours") == set()


# --- 2. fastadapter.load on a plain transformers model ------------------------------------------------


def peft_dir(
    tmp_path: Path, build: Callable[[], nn.Module], overrides: dict[str, Any], seed: int = 1
) -> Path:
    directory = tmp_path / f"adapter{seed}"
    make_peft(build(), lora_config(**overrides), seed=seed).save_pretrained(str(directory))
    return directory


def load_both(
    build: Callable[[], nn.Module], directory: Path, name: str = "default", **kwargs: Any
) -> tuple[Any, Any]:
    """(transformers' load_adapter, fastadapter.load), each on a fresh twin of the base."""
    theirs = build()
    theirs.load_adapter(str(directory), adapter_name=name, **kwargs)
    ours = build()
    fastadapter.load(ours, directory, adapter_name=name, **kwargs)
    return theirs, ours


def parameter_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype, bool | None]]:
    """Each parameter's name, shape, dtype and requires_grad; requires_grad of modules_to_save copies is
    left out (None): see `test_load_leaves_modules_to_save_copies_trainable_as_load_adapter_does`."""
    return [
        (n, tuple(p.shape), p.dtype, None if ".modules_to_save." in n else p.requires_grad)
        for n, p in model.named_parameters()
    ]


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


def configs(model: Any) -> dict[str, dict[str, Any]]:
    return {name: config.to_dict() for name, config in model.peft_config.items()}


def assert_same_adapter_state(ours: Any, theirs: Any, inputs: torch.Tensor = INPUTS) -> None:
    assert module_types(ours) == module_types(theirs)
    assert parameter_table(ours) == parameter_table(theirs)
    assert ours._hf_peft_config_loaded is True
    assert configs(ours) == configs(theirs)
    assert ours.active_adapters() == theirs.active_adapters()
    assert torch.equal(logits(ours, inputs), logits(theirs, inputs))


@pytest.mark.parametrize("name", ["default", "other"])
@pytest.mark.parametrize("case", ["llama", "gpt2_conv1d", "seq_cls"])
def test_load_leaves_the_model_as_transformers_load_adapter_does(
    tmp_path: Path, case: str, name: str
) -> None:
    build, overrides = {
        "llama": CASES["llama"],
        "gpt2_conv1d": CASES["gpt2_conv1d"],
        # PEFT's PeftModelForSequenceClassification saves the head as modules_to_save.
        "seq_cls": (seq_cls, {"task_type": "SEQ_CLS"}),
    }[case]
    directory = peft_dir(tmp_path, build, overrides)
    theirs, ours = load_both(build, directory, name)
    assert any(type(m).__module__.startswith("peft.") for m in theirs.modules())
    assert_same_adapter_state(ours, theirs)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_leaves_modules_to_save_copies_trainable_as_load_adapter_does(
    tmp_path: Path, is_trainable: bool
) -> None:
    """transformers' load_adapter(is_trainable=False) freezes the LoRA layers only: the adapter's
    modules_to_save copy (here the classification head) stays trainable (PEFT's from_pretrained freezes
    it)."""
    directory = peft_dir(tmp_path, seq_cls, {"task_type": "SEQ_CLS"})
    theirs, ours = load_both(seq_cls, directory, is_trainable=is_trainable)
    expected = {n: p.requires_grad for n, p in theirs.named_parameters() if ".modules_to_save." in n}
    assert expected == {"score.modules_to_save.default.weight": True}
    assert {n: p.requires_grad for n, p in ours.named_parameters() if ".modules_to_save." in n} == expected


@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable_gives_load_adapters_requires_grad_and_training_mode(
    tmp_path: Path, is_trainable: bool
) -> None:
    """Also the train/eval flags: transformers' load_adapter(is_trainable=False) puts the whole model in
    eval mode; with is_trainable=True it leaves the mode alone."""
    directory = peft_dir(tmp_path, tiny_llama, {})

    def build() -> nn.Module:
        return tiny_llama().train()

    theirs, ours = load_both(build, directory, is_trainable=is_trainable)
    assert any(p.requires_grad for p in theirs.parameters()) == is_trainable
    assert parameter_table(ours) == parameter_table(theirs)
    assert configs(ours) == configs(theirs)
    assert [(n, m.training) for n, m in ours.named_modules()] == [
        (n, m.training) for n, m in theirs.named_modules()
    ]


def test_every_transformers_adapter_method_works_after_load(tmp_path: Path) -> None:
    directory = peft_dir(tmp_path, tiny_llama, {})
    theirs, ours = load_both(tiny_llama, directory)
    base_logits = logits(tiny_llama(), INPUTS)
    assert not torch.equal(logits(theirs, INPUTS), base_logits)

    for model in (theirs, ours):
        model.disable_adapters()
    assert torch.equal(logits(ours, INPUTS), base_logits)
    assert torch.equal(logits(theirs, INPUTS), base_logits)
    for model in (theirs, ours):
        model.enable_adapters()
    assert torch.equal(logits(ours, INPUTS), logits(theirs, INPUTS))

    expected = theirs.get_adapter_state_dict()
    got = ours.get_adapter_state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    theirs.save_pretrained(str(tmp_path / "transformers"))
    ours.save_pretrained(str(tmp_path / "ours"))
    assert (tmp_path / "ours" / SAFETENSORS).read_bytes() == (
        tmp_path / "transformers" / SAFETENSORS
    ).read_bytes()
    assert (tmp_path / "ours" / SAFETENSORS).read_bytes() == (directory / SAFETENSORS).read_bytes()

    for model in (theirs, ours):
        model.delete_adapter("default")
    assert ours._hf_peft_config_loaded is False
    assert module_types(ours) == module_types(theirs)
    assert torch.equal(logits(ours, INPUTS), base_logits)


@pytest.mark.parametrize("first_by", ["fastadapter", "transformers"])
def test_a_second_adapter_loaded_by_fastadapter_switches_like_load_adapter(
    tmp_path: Path, first_by: str
) -> None:
    first = peft_dir(tmp_path, tiny_llama, {}, seed=1)
    second = peft_dir(tmp_path, tiny_llama, OTHER, seed=5)
    theirs = tiny_llama()
    theirs.load_adapter(str(first), adapter_name="default")
    theirs.load_adapter(str(second), adapter_name="other")
    ours = tiny_llama()
    if first_by == "fastadapter":
        fastadapter.load(ours, first, adapter_name="default")
    else:
        ours.load_adapter(str(first), adapter_name="default")
    fastadapter.load(ours, second, adapter_name="other")
    assert_same_adapter_state(ours, theirs)

    outputs = []
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert ours.active_adapters() == theirs.active_adapters() == [name]
        assert torch.equal(logits(ours, INPUTS), logits(theirs, INPUTS)), name
        outputs.append(logits(ours, INPUTS))
    assert not torch.equal(*outputs)

    for model in (theirs, ours):
        model.delete_adapter("other")
    assert_same_adapter_state(ours, theirs)


@pytest.mark.parametrize("first_trainable", [False, True], ids=["first-frozen", "first-trainable"])
@pytest.mark.parametrize("is_trainable", [False, True], ids=["inference", "trainable"])
def test_a_further_adapter_leaves_the_whole_model_state_as_load_adapter(
    tmp_path: Path, is_trainable: bool, first_trainable: bool
) -> None:
    """fastadapter activates and sets eval() on the modules the plan saw, without walking the model: the
    train flags and requires_grad of every module and tensor must still be transformers' own."""
    first = peft_dir(tmp_path, tiny_llama, {}, seed=1)
    second = peft_dir(tmp_path, tiny_llama, OTHER, seed=5)

    def build() -> Any:
        model = tiny_llama()
        model.load_adapter(str(first), adapter_name="default", is_trainable=first_trainable)
        return model.train() if first_trainable else model

    theirs, ours = build(), build()
    theirs.load_adapter(str(second), adapter_name="other", is_trainable=is_trainable)
    fastadapter.load(ours, second, adapter_name="other", is_trainable=is_trainable)
    assert_same_state(model_state(ours), model_state(theirs))


def test_layers_built_from_an_earlier_loads_template_follow_each_files_config(tmp_path: Path) -> None:
    """PEFT's layer template is kept across loads, keyed by name, kind, config and model settings: loads
    that differ only in a setting the template holds (dropout) must each get their own."""
    for seed, dropout in enumerate((0.0, 0.1, 0.0, 0.25)):
        directory = peft_dir(tmp_path / str(seed), tiny_llama, {"lora_dropout": dropout}, seed=seed + 1)
        theirs, ours = load_both(tiny_llama, directory)
        assert_same_state(model_state(ours), model_state(theirs))
        got = ours.model.layers[0].self_attn.q_proj.lora_dropout["default"]
        assert got.p == dropout if dropout else isinstance(got, nn.Identity)


# Every torch.nn.init function a layer's construction or PEFT's reset_lora_parameters may call.
INIT_FUNCTIONS = (
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "uniform_",
    "normal_",
    "trunc_normal_",
    "orthogonal_",
    "zeros_",
    "ones_",
    "constant_",
)


@contextmanager
def counting_inits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every call of a torch.nn.init function on a real (not meta) tensor."""
    calls: list[str] = []
    with monkeypatch.context() as patch:
        for fname in INIT_FUNCTIONS:
            original = getattr(torch.nn.init, fname)

            def counted(
                tensor: torch.Tensor, *args: Any, _f: Any = original, _n: str = fname, **kw: Any
            ) -> Any:
                if tensor.device.type != "meta":
                    calls.append(f"{_n}{tuple(tensor.shape)}")
                return _f(tensor, *args, **kw)

            patch.setattr(torch.nn.init, fname, counted)
        yield calls


def test_load_does_not_random_initialise_the_weights_it_then_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = peft_dir(tmp_path, tiny_llama, {})
    theirs, ours = tiny_llama(), tiny_llama()
    with counting_inits(monkeypatch) as calls:
        theirs.load_adapter(str(directory))
    assert calls, "the counter sees transformers' initialisation of the LoRA layers"
    with counting_inits(monkeypatch) as calls:
        fastadapter.load(ours, directory)
    assert calls == []
    assert torch.equal(logits(ours, INPUTS), logits(theirs, INPUTS))


def test_from_pretrained_of_an_adapter_directory_still_works_after_fastadapter_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(str(base_dir))
    make_peft(tiny_llama(), lora_config()).save_pretrained(str(adapter_dir))
    config = json.loads((adapter_dir / CONFIG).read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter_dir / CONFIG).write_text(json.dumps(config))

    expected = logits(
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)
        ).eval(),
        INPUTS,
    )
    fastadapter.load(tiny_llama(), adapter_dir)  # fastadapter has now run in this process
    model = AutoModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    assert model._hf_peft_config_loaded is True
    assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.")
    assert torch.equal(logits(model, INPUTS), expected)
