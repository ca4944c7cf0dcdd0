"""The ``MultiTaskModel`` contract every model class keeps, one parametrized suite (a new model class is
tested by adding a case to ``CASES``):

* routing: ``model(x, task)`` is the task's own network, written out here in float64 from the model's
  tensors (TAPS: ``w_base + I(s >= tau) * delta`` and the task's norms; the baselines: the task's
  backbone copy or the shared backbone, then its head; progressive: ``w_base + B @ A * alpha / rank``
  of the adapter the task routes to; LoRA: the same with PEFT's ``lora_A``/``lora_B`` of the task's own
  adapter); an unknown task is refused by name; switching tasks leaks nothing;
* costs: ``task_cost``, ``total_params_multiple`` and ``minimum_fractions`` equal counts made here from
  the parameters (a tensor shared by several tasks counted once in the total); a closed TAPS gate
  costs exactly that layer less;
* task files: models that export write exactly the tensors the cost counts, and a fresh model on the
  same base loaded from the file computes the task's outputs bit for bit; the others refuse to export;
* task bookkeeping (models with ``add_task``/``remove_task``): a new task routes, a removed one is
  refused and its parameters are gone.
"""
import copy
import json
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import taps_lightning as tl
from helpers import explicit_task_network, randomize_tasks
from taps_lightning.models.lora import PeftLoRALayer
from taps_lightning.models.progressive import LoRALayer

TASKS = {"a": 3, "b": 5, "c": 3}  # a and c have the same width: a head mixed up between them still runs
RANK, ALPHA = 2, 3.0  # progressive adapters: scaling alpha / rank = 1.5
PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _backbone() -> nn.Module:
    """The shared base: timm's random ``test_resnet`` drawn after ``manual_seed(0)`` (the same every call)."""
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=0)


BASE = sum(p.numel() for p in _backbone().parameters())


def _x(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(dtype)


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _modules_of(root: nn.Module, kind) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, kind)]


def _randomize_norms(model: tl.MultiTaskModel) -> None:
    """Every task's norm copies get their own values (so a norm mixed up between tasks shows)."""
    with torch.no_grad():
        for _, norm in _modules_of(model.backbone, tl.TaskNorm):
            for task_norm in norm.norms.values():
                for p in task_norm.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
                task_norm.running_mean.normal_(0, 0.1)
                task_norm.running_var.uniform_(0.5, 1.5)


def _task_norm_params(model: tl.MultiTaskModel, task: str) -> list[torch.Tensor]:
    """The parameters of ``task``'s own norm copies, found by walking the backbone."""
    backbone = getattr(model, "backbone", None)
    return [p for _, norm in (_modules_of(backbone, tl.TaskNorm) if backbone is not None else [])
            for p in norm.norms[task].parameters()]


# -- TAPS ------------------------------------------------------------------------------------------
#: Layers whose gate is closed, per task (every other layer of the task is active).
TAPS_OFF = {"a": ("conv1", "layer1.0.conv1", "layer3.0.downsample.0"), "b": ("layer2.0.conv2",), "c": ()}


def _taps() -> tl.TapsModel:
    model = tl.TapsModel(_backbone(), tasks=TASKS)
    torch.manual_seed(1)
    randomize_tasks(model, off=TAPS_OFF)
    return model


def _taps_reference(model, task):
    return explicit_task_network(model, task)[0]


def _taps_owned(model, task):
    layers = _modules_of(model.backbone, tl.TapsLayer)
    on = [layer for _, layer in layers if layer.taps_score[task].item() >= model.threshold]
    return dict(active_layers=len(on), gated_layers=len(layers), delta=[layer.taps_delta[task] for layer in on],
                norm=_task_norm_params(model, task), head=list(model.heads[task].parameters()))


def _taps_fresh():
    return tl.TapsModel(_backbone())


# -- the baselines: fine-tuning, feature extractor, joint fine-tuning ------------------------------
def _multihead(copy_per_task: bool, train_backbone: bool) -> Callable[[], tl.MultiHeadModel]:
    def build():
        model = tl.MultiHeadModel(_backbone(), TASKS, copy_per_task=copy_per_task, train_backbone=train_backbone)
        torch.manual_seed(1)
        with torch.no_grad():
            for net in model.backbones.values() if copy_per_task else [model.backbone]:
                for p in net.parameters():  # each copy its own weights (shared: one change for all)
                    p.add_(torch.randn_like(p) * 0.05)
                for m in net.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.normal_(0, 0.1)
                        m.running_var.uniform_(0.5, 1.5)
        return model
    return build


def _multihead_reference(model, task):
    net = model.backbones[task] if model.copy_per_task else model.backbone
    return nn.Sequential(copy.deepcopy(net), copy.deepcopy(model.heads[task]))


def _multihead_owned(model, task):
    net = model.backbones[task] if model.copy_per_task else model.backbone
    layers = sum(isinstance(m, PLAIN_LAYERS) for m in net.modules())
    return dict(active_layers=layers if model.copy_per_task else 0, gated_layers=layers,
                delta=list(net.parameters()) if model.copy_per_task else [], norm=[],
                head=list(model.heads[task].parameters()))


# -- progressive adapters ------------------------------------------------------------------------
#: Stage -> groups (the schedule is 1, 2, 3, 3 adapters): stage 0 shared by all, stage 1 by a and b,
#: stages 2 and 3 one adapter per task, in an order that is not the tasks' (adapter ``k`` is not task ``k``).
GROUPS = {1: [["a", "b"], ["c"]], 2: [["b"], ["c"], ["a"]], 3: [["c"], ["a"], ["b"]]}


def _progressive() -> tl.ProgressiveAdapterModel:
    model = tl.ProgressiveAdapterModel(_backbone(), TASKS, rank=RANK, alpha=ALPHA, num_stages=4)
    assert model.schedule == [1, 2, 3, 3]
    model.assign(GROUPS, copy_from_shared=False)  # every adapter on some task's path
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in _modules_of(model.backbone, LoRALayer):
            for b in layer.lora_B.values():
                b.normal_(0, 0.05)
    _randomize_norms(model)
    return model


def _progressive_reference(model, task):
    net = copy.deepcopy(model.backbone)
    for name, module in list(net.named_modules()):
        if isinstance(module, LoRALayer):
            plain, key = module.base_layer, module.adapter_of[task]
            update = (module.lora_B[key] @ module.lora_A[key]).reshape(plain.weight.shape) * (ALPHA / RANK)
            plain.weight = nn.Parameter((plain.weight + update).detach())
            _replace(net, name, plain)
        elif isinstance(module, tl.TaskNorm):
            _replace(net, name, module.norms[task])
    return nn.Sequential(net, copy.deepcopy(model.heads[task]))


def _progressive_owned(model, task):
    layers = _modules_of(model.backbone, LoRALayer)
    path = [(layer, layer.adapter_of[task]) for _, layer in layers]
    own = sum(1 for layer, key in path if [t for t, k in layer.adapter_of.items() if k == key] == [task])
    return dict(active_layers=own, gated_layers=len(layers),
                delta=[p for layer, key in path for p in (layer.lora_A[key], layer.lora_B[key])],
                norm=_task_norm_params(model, task), head=list(model.heads[task].parameters()))


def _progressive_fresh():
    return tl.ProgressiveAdapterModel(_backbone(), TASKS, rank=RANK, alpha=ALPHA, num_stages=4)


def _load_progressive(model, path):
    """``load_task`` reads TAPS files only (progressive runs restore from checkpoints, and the export
    module says so); written out here with the ``TaskLayer`` verbs: the grouping the file records,
    then each layer's entries of the file into the fresh model's path of the task, the head into its head."""
    with pytest.raises(tl.TaskFileError, match="progressive-adapter task file"):
        tl.load_task(model, path)
    tensors, meta = load_file(str(path)), tl.task_metadata(path)
    task = meta["task"]
    model.assign({int(s): g for s, g in json.loads(meta["groups"]).items()}, copy_from_shared=False)
    for name, layer in model.task_layers():
        layer.load_task_state(task, {local: tensors[tl.files.export.file_key(local, name)]
                                     for local in layer.state_shapes()})
    model.heads[task].load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    return task


# -- the LoRA baseline: PEFT's LoRA, one adapter per task ------------------------------------------
def _lora() -> tl.LoRAModel:
    model = tl.LoRAModel(_backbone(), TASKS, rank=RANK, alpha=ALPHA)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in _modules_of(model.backbone, PeftLoRALayer):
            for b in layer.tuner.lora_B.values():  # B = 0 at the start: every task would be the base
                b.weight.normal_(0, 0.05)
    _randomize_norms(model)
    return model


def _lora_reference(model, task):
    net = copy.deepcopy(model.backbone)
    for name, module in list(net.named_modules()):
        if isinstance(module, PeftLoRALayer):
            plain, a, b = module.tuner.base_layer, module.tuner.lora_A[task].weight, module.tuner.lora_B[task].weight
            update = (b.flatten(1) @ a.flatten(1)).reshape(plain.weight.shape) * (ALPHA / RANK)
            plain.weight = nn.Parameter((plain.weight + update).detach())
            _replace(net, name, plain)
        elif isinstance(module, tl.TaskNorm):
            _replace(net, name, module.norms[task])
    return nn.Sequential(net, copy.deepcopy(model.heads[task]))


def _lora_owned(model, task):
    layers = _modules_of(model.backbone, PeftLoRALayer)
    return dict(active_layers=len(layers), gated_layers=sum(isinstance(m, PLAIN_LAYERS) for m in _backbone().modules()),
                delta=[p for _, layer in layers for p in (layer.tuner.lora_A[task].weight, layer.tuner.lora_B[task].weight)],
                norm=_task_norm_params(model, task), head=list(model.heads[task].parameters()))


@dataclass
class Case:
    build: Callable[[], tl.MultiTaskModel]  # tasks TASKS, each with its own non-trivial state
    reference: Callable[[tl.MultiTaskModel, str], nn.Module]  # the task's network without model code
    owned: Callable[[tl.MultiTaskModel, str], dict]  # layer counts and the tensors the task stores
    fresh: Callable[[], tl.MultiTaskModel] | None = None  # the same base, for loading task files
    load: Callable[[tl.MultiTaskModel, object], str] | None = None  # a task file into ``fresh()``


CASES = {
    "taps": Case(_taps, _taps_reference, _taps_owned, _taps_fresh, tl.load_task),
    "finetune": Case(_multihead(True, True), _multihead_reference, _multihead_owned),
    "linear": Case(_multihead(False, False), _multihead_reference, _multihead_owned),
    "joint_finetune": Case(_multihead(False, True), _multihead_reference, _multihead_owned),
    "progressive": Case(_progressive, _progressive_reference, _progressive_owned, _progressive_fresh,
                        _load_progressive),
    "lora": Case(_lora, _lora_reference, _lora_owned, lambda: tl.LoRAModel(_backbone(), rank=RANK, alpha=ALPHA),
                 tl.load_task),
}
EXPORTING = [k for k in CASES if CASES[k].load is not None]


@pytest.fixture(params=list(CASES), scope="module")
def built(request):
    """``(case name, case, model)``; the model is built once per case, tests copy it before changing it."""
    case = CASES[request.param]
    return request.param, case, case.build().eval()


def test_the_cases_cover_every_model_class():
    classes = {type(case.build()) for case in CASES.values()}
    assert classes == {tl.TapsModel, tl.MultiHeadModel, tl.ProgressiveAdapterModel, tl.LoRAModel}
    assert {name for name, case in CASES.items() if case.build().can_export} == set(EXPORTING)


# -- routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_each_task_runs_its_own_network(built, grad):
    """In float64 (both the model and its written-out reference), with and without autograd (TAPS runs
    its inference cache or its fused layer): every task equals its own network."""
    name, case, model = built
    model = copy.deepcopy(model).double()
    x = _x(torch.float64)
    for task in ["b", "a", "c", "a"]:
        reference = case.reference(model, task).eval()
        with torch.set_grad_enabled(grad):
            got = model(x, task)
            want = reference(x)
        assert got.shape == (2, TASKS[task]), (name, task)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name}: task {task}")
        assert model.active_task == task


def test_tasks_differ(built):
    """The routing test means something only if the tasks compute different things."""
    name, _, model = built
    with torch.no_grad():
        a, c = model(_x(), "a"), model(_x(), "c")
    assert (a - c).abs().max() > 1e-3, name


def test_an_unknown_task_is_refused_by_name_and_changes_nothing(built):
    name, case, model = built
    model = copy.deepcopy(model)
    x = _x()
    with torch.no_grad():
        before = model(x, "b")
        for call in (lambda: model(x, "nope"), lambda: model.set_task("nope")):
            with pytest.raises(KeyError, match=r"unknown task 'nope'"):
                call()
        with pytest.raises(KeyError, match="nope"):
            model.task_cost("nope")
        assert model.active_task == "b"
        assert torch.equal(model(x), before), name  # still task b, every layer included


def test_switching_tasks_leaks_no_state(built):
    """a, b, a, c, b on one model (float64): each run is the task's own network, and a task run again
    after others gives bit for bit what it gave before."""
    name, case, model = built
    model = copy.deepcopy(model).double()
    x = _x(torch.float64)
    with torch.no_grad():
        references = {task: case.reference(model, task).eval()(x) for task in TASKS}
        first = {}
        for task in ["a", "b", "a", "c", "b"]:
            got = model(x, task)
            torch.testing.assert_close(got, references[task], rtol=1e-10, atol=1e-10, msg=f"{name}: task {task}")
            assert torch.equal(got, first.setdefault(task, got)), (name, task)
            model.set_task(task)  # setting the active task again changes nothing
            assert torch.equal(model(x), got), (name, task)


# -- costs ---------------------------------------------------------------------------------------
def _cost_by_hand(case, model, task):
    owned = case.owned(model, task)
    delta, norm, head = _numel(owned["delta"]), _numel(owned["norm"]), _numel(owned["head"])
    return {"active_layers": owned["active_layers"], "gated_layers": owned["gated_layers"], "delta_params": delta,
            "norm_params": norm, "head_params": head, "task_params": delta + norm + head, "base_params": BASE,
            "fraction": (delta + norm + head) / BASE}


def test_task_cost_is_what_the_task_stores_counted_by_hand(built):
    name, case, model = built
    assert model.base_param_count == BASE
    for task in TASKS:
        cost, hand = model.task_cost(task), _cost_by_hand(case, model, task)
        assert cost == pytest.approx(hand, rel=1e-15), (name, task)
        assert set(cost) == set(hand)
        assert cost["head_params"] == (96 + 1) * TASKS[task]  # test_resnet: 96 features


def test_total_params_multiple_counts_every_stored_tensor_once(built):
    """Base plus the union of what the tasks store (a tensor several tasks use, e.g. a shared
    progressive adapter, counted once)."""
    name, case, model = built
    stored = {}
    for task in TASKS:
        owned = case.owned(model, task)
        stored.update({id(t): t for t in owned["delta"] + owned["norm"] + owned["head"]})
    assert model.total_params_multiple() == pytest.approx((BASE + _numel(stored.values())) / BASE, rel=1e-15), name


def test_minimum_fractions_are_norms_and_head(built):
    name, case, model = built
    want = {task: (_numel(case.owned(model, task)["norm"]) + _numel(case.owned(model, task)["head"])) / BASE
            for task in TASKS}
    assert model.minimum_fractions() == pytest.approx(want, rel=1e-15), name


def test_a_closed_taps_gate_costs_exactly_that_layer_less():
    model = CASES["taps"].build()
    layer = model.backbone.get_submodule("layer4.0.conv2")
    before = model.task_cost("c")
    assert layer.is_active("c")
    layer.close_gate("c")
    after = model.task_cost("c")
    size = layer.base_layer.weight.numel()
    assert after["active_layers"] == before["active_layers"] - 1
    assert after["delta_params"] == before["delta_params"] - size
    assert after["task_params"] == before["task_params"] - size
    assert after["fraction"] == pytest.approx((before["task_params"] - size) / BASE, rel=1e-15)
    assert {k: after[k] for k in ("gated_layers", "norm_params", "head_params", "base_params")} == \
           {k: before[k] for k in ("gated_layers", "norm_params", "head_params", "base_params")}
    assert model.task_cost("a") == _cost_by_hand(CASES["taps"], model, "a")  # the other tasks as they were


# -- task files ----------------------------------------------------------------------------------
#: Entries a task file holds besides what the cost counts: scores (one scalar per layer) and the
#: norms' running statistics (buffers, not counted, as in the paper).
UNCOUNTED = ("running_mean", "running_var", "num_batches_tracked")


def _file_counts(tensors: dict) -> dict:
    """What the file stores, sorted into what the cost counts: weight deltas or adapters, the norms'
    affine parameters, the head; anything else must be a score or a norm buffer."""
    counts = {"delta": 0, "norm": 0, "head": 0, "delta_layers": set()}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind in ("delta", "lora_A", "lora_B"):
            counts["delta"] += value.numel()
            counts["delta_layers"].add(rest)
        elif kind == "norm" and rest.endswith((".weight", ".bias")):
            counts["norm"] += value.numel()
        elif kind == "head":
            assert rest in ("weight", "bias"), key
            counts["head"] += value.numel()
        else:
            assert kind == "score" or (kind == "norm" and rest.endswith(UNCOUNTED)), f"unexpected entry {key}"
    return counts


@pytest.mark.parametrize("name", EXPORTING)
def test_a_task_file_holds_exactly_what_the_task_costs(name, tmp_path):
    case = CASES[name]
    model = case.build().eval()
    for task in TASKS:
        tensors = load_file(str(tl.save_task(model, task, tmp_path / f"{task}.safetensors")))
        counts, cost = _file_counts(tensors), model.task_cost(task)
        assert (counts["delta"], counts["norm"], counts["head"]) == \
               (cost["delta_params"], cost["norm_params"], cost["head_params"]), (name, task)
        assert counts["delta"] + counts["norm"] + counts["head"] == _cost_by_hand(case, model, task)["task_params"]
        if name == "taps":  # the deltas of the active layers only, a score for every layer
            active = {n for n, layer in _modules_of(model.backbone, tl.TapsLayer)
                      if layer.taps_score[task].item() >= model.threshold}
            assert counts["delta_layers"] == active and not active & set(TAPS_OFF[task])
            assert {k for k in tensors if k.startswith("score.")} == {f"score.{n}" for n in model.gated_names}
        elif name == "lora":  # its own adapter of every layer PEFT adapts
            assert counts["delta_layers"] == set(model.lora_names)
        else:  # progressive: the task's adapter (shared or its own) of every layer on its path
            assert counts["delta_layers"] == set(model.gated_names)


@pytest.mark.parametrize("name", EXPORTING)
def test_a_task_file_loaded_into_a_fresh_model_computes_the_same(name, tmp_path):
    case = CASES[name]
    model = case.build().eval()
    x = _x()
    for task in ["b", "a"]:
        path = tl.save_task(model, task, tmp_path / f"{task}.safetensors")
        fresh = case.fresh().eval()
        assert case.load(fresh, path) == task
        with torch.no_grad():
            assert torch.equal(fresh(x, task), model(x, task)), (name, task)
        # the same task, not only the same function: a closed layer with a zero delta computes the
        # base too, but stays closed (and costs nothing) only if its score came with the file
        assert fresh.task_cost(task) == model.task_cost(task), (name, task)
        assert torch.equal(fresh.gate_tensor(task), model.gate_tensor(task)) if model.learns_gates else True


@pytest.mark.parametrize("name", [k for k in CASES if k not in EXPORTING])
def test_models_without_task_files_refuse_to_save_one(name, tmp_path):
    model = CASES[name].build()
    assert not model.can_export
    path = tmp_path / "a.safetensors"
    with pytest.raises(tl.TaskFileError, match="MultiHeadModel has no task files; it stores tasks in its checkpoint"):
        tl.save_task(model, "a", path)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


# -- task bookkeeping ----------------------------------------------------------------------------
BOOKKEEPING = [k for k in CASES if hasattr(type(CASES[k].build()), "remove_task")]


def test_bookkeeping_cases_are_the_classes_that_support_it():
    assert BOOKKEEPING == ["taps", "lora"]  # MultiHeadModel and ProgressiveAdapterModel fix their tasks at creation


@pytest.mark.parametrize("name", BOOKKEEPING)
def test_an_added_task_routes_and_a_removed_task_is_gone(name):
    """Add d, remove b (a task in the middle, so a removal aimed at the first task shows)."""
    case = CASES[name]
    model = case.build().eval().double()
    x = _x(torch.float64)
    with torch.no_grad():
        before = {task: model(x, task) for task in ("a", "c")}
        model.add_task("d", 2)
        assert model.tasks == ["a", "b", "c", "d"] and model.num_classes["d"] == 2
        got = model(x, "d")
        assert got.shape == (2, 2)
        torch.testing.assert_close(got, case.reference(model, "d").eval()(x), rtol=1e-10, atol=1e-10)
        assert model.task_cost("d") == _cost_by_hand(case, model, "d")
        model.set_task(None)  # a new task starts from the shared (pre-trained) network, its head on top
        torch.testing.assert_close(got, model.heads["d"](model.forward_features(x)), rtol=1e-10, atol=1e-10)
        owned_b = {id(p) for p in model.task_parameters("b")}
        model.set_task("b")
        model.remove_task("b")
        assert model.active_task is None and model.tasks == ["a", "c", "d"]
        with pytest.raises(KeyError, match=r"unknown task 'b'"):
            model(x, "b")
        names = [n for n, _ in model.named_parameters()]
        assert not [n for n in names if "b" in n.split(".")], "parameters of the removed task remain"
        assert not owned_b & {id(p) for p in model.parameters()}
        for task in ("a", "c", "d"):  # every other task keeps all it owns
            assert {"heads." + task + ".weight"} <= set(names)
            assert model.task_cost(task) == _cost_by_hand(case, model, task), task
        for task in ("a", "c"):  # and computes as before
            assert torch.equal(model(x, task), before[task]), task
