"""``taps_lightning.core.task_layer``: the verbs every per-task layer speaks, on each concrete kind (the TAPS
layer, the task norm, the LoRA layer). ``set_task`` picks the state a forward runs (``None``: the
shared layer alone), ``remove_task`` drops exactly the task's own state, ``task_parameters`` are what
a task trains, ``merged_layer`` computes what the layer computes for the task, and the task-file verbs
(``state_shapes``, ``task_state``, ``load_task_state``) carry one task's state and nothing else."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import taps_lightning as tl
from helpers import assert_rounding_close, two_task_taps_layer
from taps_lightning.core.norms import TaskNorm
from taps_lightning.models.progressive import LoRALayer

KINDS = ("taps", "norm", "lora")


def _per_task_state_names(layer: nn.Module) -> set[str]:
    """Attributes of ``layer`` itself that are dicts keyed by its tasks (found, not declared)."""
    tasks = set(layer.tasks)
    found = set()
    for name, child in layer.named_children():
        if isinstance(child, (nn.ParameterDict, nn.ModuleDict)) and tasks and tasks <= set(child.keys()):
            found.add(name)
    return found


def _layer(kind: str, tasks=("a", "b"), task_seed: int = 1) -> nn.Module:
    """A layer of ``kind`` on a shared Linear(5, 6) or BatchNorm1d(5) (the same for every call), with
    ``tasks``, each given its own random state drawn from ``task_seed``: a TAPS delta (every gate open),
    a norm copy's parameters and statistics, or a LoRA adapter of its own (rank 2, alpha 4: scaling 2)."""
    torch.manual_seed(0)
    if kind == "taps":
        layer = tl.create_taps_layer(nn.Linear(5, 6), tl.TapsConfig(threshold=0.1, score_init=0.15))
    elif kind == "norm":
        base = nn.BatchNorm1d(5)
        with torch.no_grad():
            base.weight.normal_()
            base.bias.normal_()
        layer = TaskNorm(base)
    else:
        layer = LoRALayer(nn.Linear(5, 6), rank=2, alpha=4.0)
    torch.manual_seed(task_seed)
    for i, task in enumerate(tasks):
        if kind == "lora":
            layer.add_adapter(str(i))
            layer.add_task(task, str(i))
        else:
            layer.add_task(task)
        with torch.no_grad():
            for p in layer.task_parameters(task):
                if p.dim():
                    p.normal_()
                else:  # a TAPS score: open (>= 0.1), and not the same for every task
                    p.uniform_(0.11, 0.5)
            if kind == "norm":
                layer.task_norm(task).running_mean.normal_()
                layer.task_norm(task).running_var.uniform_(0.5, 2.0)
    return layer.eval()


def _shared(layer: nn.Module) -> nn.Module:
    return layer.base_norm if isinstance(layer, TaskNorm) else layer.base_layer


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_each_layer_declares_exactly_the_attributes_that_hold_per_task_state():
    lora = LoRALayer(nn.Linear(5, 6), rank=2)
    lora.add_adapter("0")
    lora.add_task("a")
    lora.add_task("b")
    norm = TaskNorm(nn.BatchNorm2d(4))
    norm.add_task("a")
    norm.add_task("b")
    layer = two_task_taps_layer()
    assert set(layer.adapter_layer_names) == _per_task_state_names(layer) == {"taps_delta", "taps_score"}
    assert set(norm.adapter_layer_names) == _per_task_state_names(norm) == {"norms"}
    # LoRA keys its tensors by adapter, several tasks may share one: declared, found by adapter key
    assert set(lora.adapter_layer_names) == {"lora_A", "lora_B"}
    assert all(set(getattr(lora, n).keys()) == {"0"} for n in lora.adapter_layer_names)


def test_norm_and_lora_state_round_trip_through_the_same_verbs():
    torch.manual_seed(0)
    norm = TaskNorm(nn.BatchNorm2d(4))
    norm.add_task("a")
    with torch.no_grad():
        norm.task_norm("a").weight.uniform_()
        norm.task_norm("a").running_var.uniform_(1, 2)
    state = norm.task_state("a")
    assert set(state) == set(norm.state_shapes()) == {f"norm.{k}" for k in nn.BatchNorm2d(4).state_dict()}
    other = TaskNorm(nn.BatchNorm2d(4))
    other.add_task("a")
    other.load_task_state("a", state)
    for k, v in norm.task_norm("a").state_dict().items():
        assert torch.equal(other.task_norm("a").state_dict()[k], v)

    lora = LoRALayer(nn.Linear(5, 6), rank=2)
    for key in ("0", "1"):
        lora.add_adapter(key)
    lora.add_task("a", "1")
    with torch.no_grad():
        lora.lora_B["1"].normal_()
    assert lora.state_shapes() == {"lora_A": torch.Size([2, 5]), "lora_B": torch.Size([6, 2])}
    state = lora.task_state("a")
    assert torch.equal(state["lora_B"], lora.lora_B["1"])  # the adapter on a's route, not adapter 0
    lora.route("a", "0")
    assert lora.adapter_for("a") == "0" and torch.equal(lora.task_state("a")["lora_B"], torch.zeros(6, 2))
    lora.copy_adapter("1", "0")
    assert torch.equal(lora.lora_B["0"], lora.lora_B["1"]) and lora.adapter_size("0") == 2 * 5 + 6 * 2


@pytest.mark.parametrize("kind", KINDS)
def test_set_task_runs_that_tasks_state_and_none_the_shared_layer_alone(kind):
    layer = _layer(kind)
    x = torch.randn(4, 5)
    assert layer.active_task is None
    with torch.no_grad():
        shared = _shared(layer)(x)
        outputs = {}
        for task in ("a", "b", None):
            layer.set_task(task)
            assert layer.active_task == task
            outputs[task] = layer(x)
        torch.testing.assert_close(outputs[None], shared, rtol=0, atol=0)  # the very same computation
        # each task's own state changes the output, each differently
        assert not torch.allclose(outputs["a"], shared) and not torch.allclose(outputs["b"], shared)
        assert not torch.allclose(outputs["a"], outputs["b"])
        layer.set_task("a")
        torch.testing.assert_close(layer(x), outputs["a"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_task_drops_exactly_that_tasks_own_state(kind):
    layer = _layer(kind)
    x = torch.randn(4, 5)
    own = {t: {id(p) for p in layer.task_parameters(t)} for t in ("a", "b")}
    assert own["a"] and own["b"] and not own["a"] & own["b"]
    before = {id(p) for p in layer.parameters()}
    b_state = {k: v.clone() for k, v in layer.task_state("b").items()}
    layer.set_task("b")
    with torch.no_grad():
        b_out = layer(x)
    layer.set_task("a")
    layer.remove_task("a")
    assert layer.tasks == ["b"] and layer.active_task is None  # the removed task no longer runs
    # a TAPS delta and score, or a norm copy, go with their task; a LoRA task is a route to an adapter
    # (several tasks may share one), so the adapter stays and only the route goes
    gone = set() if kind == "lora" else own["a"]
    assert {id(p) for p in layer.parameters()} == before - gone
    assert {id(p) for p in layer.task_parameters("b")} == own["b"]
    assert all(torch.equal(v, b_state[k]) for k, v in layer.task_state("b").items())
    with pytest.raises((KeyError, AttributeError)):  # (a ParameterDict raises AttributeError)
        list(layer.task_parameters("a"))
    layer.set_task("b")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), b_out, rtol=0, atol=0)
    # removing a task that is not the active one leaves the active one running
    if kind == "lora":
        layer.add_task("a", "0")
    else:
        layer.add_task("a")
    layer.remove_task("a")
    assert layer.active_task == "b" and layer.tasks == ["b"]


@pytest.mark.parametrize("kind", KINDS)
def test_task_parameters_are_exactly_what_a_forward_of_the_task_trains(kind):
    layer = _layer(kind).train()
    _shared(layer).requires_grad_(False)  # the shared layer frozen, as in incremental TAPS and the adapters
    layer.set_task("a")
    (layer(torch.randn(4, 5)) * torch.randn(4, 5 if kind == "norm" else 6)).sum().backward()
    trained = {id(p) for p in layer.parameters() if p.grad is not None}
    assert trained == {id(p) for p in layer.task_parameters("a")}
    assert all(p.grad.any() for p in layer.task_parameters("a"))


def _float64_weight(layer: nn.Module, task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``task``'s weight in float64 from the layer's tensors, the same sum of absolute values, and the
    roundings a float32 weight element meets (a TAPS add; LoRA's rank-2 dot, the scaling and the add)."""
    base = layer.base_layer.weight.detach().double()
    if isinstance(layer, LoRALayer):
        a, b = (p.detach().double() for p in layer.adapter_parameters(layer.adapter_for(task)))
        return base + b @ a * layer.scaling, base.abs() + b.abs() @ a.abs() * layer.scaling, layer.rank + 2
    delta = layer.taps_delta[task].detach().double() if layer.is_active(task) else torch.zeros_like(base)
    return base + delta, base.abs() + delta.abs(), 1


@pytest.mark.parametrize("kind, gate", [("taps", "open"), ("taps", "closed"), ("lora", None)])
def test_merged_layer_computes_what_the_layer_computes_for_the_task(kind, gate):
    layer = _layer(kind)
    if gate == "closed":
        layer.close_gate("a")
    x = torch.randn(4, 5)
    weight, weight_magnitude, roundings = _float64_weight(layer, "a")
    bias = layer.base_layer.bias.detach().double()
    exact = F.linear(x.double(), weight, bias)
    magnitude = F.linear(x.double().abs(), weight_magnitude, bias.abs())
    terms = 5 + 1 + roundings  # five products and the bias, after the weight's own roundings

    merged = layer.merged_layer("a")
    assert type(merged) is nn.Linear and not {p.data_ptr() for p in merged.parameters()} & {
        p.data_ptr() for p in layer.parameters()}  # a plain copy, nothing shared with the layer
    layer.set_task("a")
    with torch.no_grad():
        assert_rounding_close(merged(x), exact, magnitude, terms, msg="merged layer")
        assert_rounding_close(layer(x), exact, magnitude, terms, msg="layer, inference")
    assert_rounding_close(layer.train()(x), exact, magnitude, terms, msg="layer, training")
    if gate == "closed":  # a closed gate merges to the shared layer alone
        assert torch.equal(merged.weight, layer.base_layer.weight)


@pytest.mark.parametrize("kind", ["taps", "lora"])
def test_task_tensors_are_what_the_task_adds_detached(kind):
    layer = _layer(kind)
    tensors = layer.task_tensors("a")
    assert set(tensors) == {"delta"} and not tensors["delta"].requires_grad
    if kind == "taps":
        assert torch.equal(tensors["delta"], layer.taps_delta["a"])
        layer.close_gate("a")
        assert layer.task_tensors("a") == {}  # a closed gate adds nothing
    else:  # B @ A x alpha / rank: two products per element, then the scaling
        a, b = layer.adapter_parameters("0")
        exact = b.detach().double() @ a.detach().double() * 2.0
        magnitude = b.detach().double().abs() @ a.detach().double().abs() * 2.0
        assert_rounding_close(tensors["delta"], exact, magnitude, terms=3)


@pytest.mark.parametrize("kind", KINDS)
def test_load_task_state_writes_that_tasks_state_alone(kind):
    source = _layer(kind)
    state = source.task_state("a")
    shapes = source.state_shapes()
    assert state and all(k in shapes and v.shape == shapes[k] for k, v in state.items())
    assert not any(v.requires_grad for v in state.values())
    # another layer on the same shared weights, with tasks of its own and one to load into
    target = _layer(kind, tasks=("a", "b", "c"), task_seed=7)
    assert all(not torch.equal(v, target.task_state(t)[k]) for t in target.tasks for k, v in state.items()
               if v.is_floating_point())  # so that a write into another task shows
    kept = {t: {k: v.clone() for k, v in target.task_state(t).items()} for t in ("a", "b")}
    shared = _state(_shared(target))
    target.load_task_state("c", state)
    loaded = target.task_state("c")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    for task, before in kept.items():
        assert all(torch.equal(v, before[k]) for k, v in target.task_state(task).items()), task
    assert all(torch.equal(v, shared[k]) for k, v in _shared(target).state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_load_task_state_refuses_a_wrong_shape_or_entry_by_name_and_writes_nothing(kind):
    layer = _layer(kind)
    before = {k: v.clone() for k, v in layer.task_state("a").items()}
    name, shape = next((k, s) for k, s in layer.state_shapes().items() if len(s) >= 1 and s.numel() > 1)
    # a shape ``copy_`` would broadcast (one element) and an entry the layer does not hold
    expected = ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "")
    for bad, message in (({name: torch.zeros(1)}, rf"{name}: shape \(1,\), expected \({expected}\)"),
                         ({"bogus": torch.zeros(1)}, r"bogus: not an entry of this layer")):
        with pytest.raises(ValueError, match=rf"^{type(layer).__name__}\.load_task_state: {message}"):
            layer.load_task_state("a", {**layer.task_state("a"), **bad})
        assert all(torch.equal(v, before[k]) for k, v in layer.task_state("a").items())
