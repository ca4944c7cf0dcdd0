"""The LoRA baseline (``--model.mode lora``, PEFT's LoRA, one adapter per task).

* fidelity: the progressive adapters' own ``LoRALayer`` and PEFT's LoRA, given the same A and B, compute
  the same outputs and gradients in float64 (Conv2d with stride and padding, and Linear), draw A from the
  same distribution and start B at zero; where they differ (grouped convolutions) is pinned here;
* grouped convolutions (test_efficientnet's depthwise convs): ``frozen`` leaves them shared and untrained,
  ``full`` gives each task its own copy (PEFT's ``modules_to_save``); both route, count, save/load and
  merge to a plain model computing the task;
* training: one step updates every task's adapters, norms and heads and nothing of the base;
* refusals: a flag of another mode, a task file of another kind or settings, each by name.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

import taps_lightning as tl
from taps_lightning.errors import SettingsError
from taps_lightning.models.lora import PeftFullLayer, PeftLoRALayer
from taps_lightning.models.progressive import LoRALayer
from taps_lightning.training.compose import create_taps_module

RANK, ALPHA = 2, 3.0


def _peft_layer(base: nn.Module, dropout: float = 0.0) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(base))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["0"]), holder,
                            adapter_name="t")
    return holder[0]


def _own_layer(base: nn.Module) -> LoRALayer:
    layer = LoRALayer(copy.deepcopy(base), rank=RANK, alpha=ALPHA)
    layer.add_adapter("t")
    layer.add_task("t", "t")
    layer.set_task("t")
    return layer


@pytest.mark.parametrize("base", [nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Linear(7, 4)], ids=["conv2d", "linear"])
def test_peft_lora_and_the_progressive_lora_layer_agree_in_float64(base):
    """Same A/B (PEFT's convolution lora_A flattened is LoRALayer's [rank, fan_in] A): same output, same
    gradients for the input, A and B; both scale by alpha / rank."""
    torch.manual_seed(0)
    peft, own = _peft_layer(base).double(), _own_layer(base).double()
    with torch.no_grad():
        peft.lora_B["t"].weight.normal_(0, 0.3)
        own.lora_A["t"].copy_(peft.lora_A["t"].weight.flatten(1))
        own.lora_B["t"].copy_(peft.lora_B["t"].weight.flatten(1))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64) if isinstance(base, nn.Conv2d) else torch.randn(6, 7).double()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [peft(xs[0]), own(xs[1])]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(peft.lora_A["t"].weight.grad.flatten(1), own.lora_A["t"].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(peft.lora_B["t"].weight.grad.flatten(1), own.lora_B["t"].grad, rtol=1e-12, atol=1e-12)
    # and both equal the written-out w + B @ A * alpha / rank
    weight = base.weight.double() + (own.lora_B["t"] @ own.lora_A["t"]).view_as(base.weight).detach() * ALPHA / RANK
    plain = (F.conv2d(x, weight, base.bias.double(), base.stride, base.padding) if isinstance(base, nn.Conv2d)
             else F.linear(x, weight, base.bias.double()))
    torch.testing.assert_close(outs[0].detach(), plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", [nn.Conv2d(16, 32, 3), nn.Linear(64, 32)], ids=["conv2d", "linear"])
def test_both_start_from_the_base_with_a_drawn_as_kaiming_uniform(base):
    """B = 0 (each task starts as the pre-trained layer) and A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PEFT's
    and LoRALayer's ``kaiming_uniform_(a=sqrt(5))``: the same law (not the same draws: PEFT's layers draw
    once more when they are built). Checked by the bound and the variance, bound**2 / 3."""
    torch.manual_seed(0)
    fan_in = base.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)
    peft, own = _peft_layer(base), _own_layer(base)
    for a, b in ((peft.lora_A["t"].weight, peft.lora_B["t"].weight), (own.lora_A["t"], own.lora_B["t"])):
        assert not b.any()
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert a.double().var().item() == pytest.approx(bound ** 2 / 3, rel=0.25)


def test_peft_does_not_give_lora_to_a_grouped_convolution_the_progressive_layer_does():
    """What differs: PEFT builds a grouped conv's lora_A over all input channels (not a low-rank delta of the
    layer's own [out, in/groups, k, k] weight), needs rank % groups == 0 and cannot merge it; LoRALayer's delta
    is the weight's shape. So the LoRA baseline never adapts grouped convolutions (frozen or full copies)."""
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    with pytest.raises(ValueError, match="groups"):
        _peft_layer(depthwise)  # rank 2 is not a multiple of 8 groups
    own = _own_layer(depthwise)
    assert own.adapter_weight("t").shape == depthwise.weight.shape
    model = tl.LoRAModel(timm.create_model("test_efficientnet", num_classes=0), {"a": 3})
    grouped = [n for n, m in timm.create_model("test_efficientnet", num_classes=0).named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and model.grouped_names == grouped
    assert not any(isinstance(model.backbone.get_submodule(n), (PeftLoRALayer, PeftFullLayer)) for n in grouped)


# -- grouped convolutions: frozen or full copies, on a backbone with depthwise convs ----------------------
TASKS = {"a": 3, "b": 4}


def _efficientnet_lora(grouped_convs: str) -> tl.LoRAModel:
    torch.manual_seed(0)
    model = tl.LoRAModel(timm.create_model("test_efficientnet", num_classes=0), TASKS, rank=RANK, alpha=ALPHA,
                         grouped_convs=grouped_convs)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or ".norms." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _reference(model: tl.LoRAModel, task: str) -> nn.Module:
    """The task's network written out: each LoRA layer w + B @ A * alpha / r, each full copy as is, the
    task's norms, its head."""
    net = copy.deepcopy(model.backbone)
    def replace(name, plain):
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, plain)

    for name, module in list(net.named_modules()):
        if isinstance(module, PeftLoRALayer):
            plain, a, b = module.tuner.base_layer, module.tuner.lora_A[task].weight, module.tuner.lora_B[task].weight
            plain.weight = nn.Parameter((plain.weight + (b.flatten(1) @ a.flatten(1)).view_as(plain.weight)
                                         * ALPHA / RANK).detach())
            replace(name, plain)
        elif isinstance(module, PeftFullLayer):
            replace(name, module.tuner.modules_to_save[task])
        elif isinstance(module, tl.TaskNorm):
            replace(name, module.norms[task])
    return nn.Sequential(net, copy.deepcopy(model.heads[task])).eval()


@pytest.mark.parametrize("grouped_convs", ["frozen", "full"])
def test_grouped_convolutions_frozen_or_copied_per_task(grouped_convs, tmp_path):
    model = _efficientnet_lora(grouped_convs).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    base = timm.create_model("test_efficientnet", num_classes=0)
    convs = [(n, m) for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    grouped = [n for n, m in convs if isinstance(m, nn.Conv2d) and m.groups > 1]
    for task in ("b", "a"):
        with torch.no_grad():
            torch.testing.assert_close(model(x, task), _reference(model, task)(x), rtol=1e-10, atol=1e-10)
        cost = model.task_cost(task)
        lora = sum(RANK * (m.weight[0].numel() + m.weight.shape[0]) for n, m in convs if n not in grouped)
        full = sum(p.numel() for n, m in convs if n in grouped for p in m.parameters()) if grouped_convs == "full" else 0
        assert cost["delta_params"] == lora + full
        assert cost["active_layers"] == len(convs) - (len(grouped) if grouped_convs == "frozen" else 0)
        assert cost["gated_layers"] == len(convs)
    own = {id(p) for p in model.task_parameters()}
    for n in grouped:  # frozen: the shared weights, in no task; full: a copy per task, trained
        layer = model.backbone.get_submodule(n)
        if grouped_convs == "frozen":
            assert not any(p.requires_grad or id(p) in own for p in layer.parameters())
        else:
            assert sorted(layer.tasks) == ["a", "b"]
            assert all(p.requires_grad for t in TASKS for p in layer.copies[t].parameters())
            assert not any(p.requires_grad for p in layer.base_layer.parameters())
    model = model.float()
    with torch.no_grad():
        want = model(x.float(), "b")
    fresh = tl.LoRAModel(timm.create_model("test_efficientnet", num_classes=0), rank=RANK, alpha=ALPHA,
                         grouped_convs=grouped_convs).eval()
    with torch.no_grad():  # the same shared weights: the fresh model's base is test_efficientnet seeded alike
        for p, q in zip(fresh.shared_parameters(), model.shared_parameters()):
            p.copy_(q)
    tl.load_task(fresh, tl.save_task(model, "b", tmp_path / "b.safetensors"))
    merged = tl.merge(model, "b").eval()
    assert not any(isinstance(m, (tl.TaskLayer,)) or type(m).__module__.startswith("peft") for m in merged.modules())
    with torch.no_grad():
        assert torch.equal(fresh(x.float(), "b"), want)
        torch.testing.assert_close(merged(x.float()), want, rtol=1e-4, atol=1e-5)


# -- training and refusals --------------------------------------------------------------------------
def test_one_step_trains_every_tasks_adapters_norms_and_heads_and_not_the_base():
    """One optimizer step on all tasks: every trained parameter has a gradient (every task's adapters,
    norms and head), nothing of the base has one or moves, and the base is what is frozen."""
    import lightning as L

    from helpers import TinyTasks, cpu_trainer

    class Grads(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            self.got = {n for n, p in pl_module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, backbone="test_resnet", mode="lora", lora_rank=2, lr=0.1)
    with torch.no_grad():  # B != 0, so A gets a gradient too; timm zero-inits each residual branch's last norm
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
            elif ".norms." in name and name.endswith(".weight"):
                p.normal_(1, 0.1)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads = Grads()
    cpu_trainer(None, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[grads]).fit(module, data)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert grads.got == trained
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if n not in trained)
    for task in data.num_classes:
        assert any(f"lora_A.{task}." in n for n in trained) and any(f"lora_B.{task}." in n for n in trained)
        assert any(f".norms.{task}." in n for n in trained) and any(f"heads.{task}." in n for n in trained)
    assert not any("base_layer" in n or "base_norm" in n for n in trained)
    assert any("base_layer" in n for n in before)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_lora_trains_saves_loads_and_merges_in_every_precision(precision, tmp_path):
    """A LoRA run in bf16 autocast, pure bf16 or float64: finite loss, parameters in the run's dtype
    (fp32 under autocast), its task file loads onto the float32 base evaluate builds (the base
    fingerprint of the rounded base matches) and computes what the run's model does."""
    import warnings

    from helpers import TinyTasks, cpu_trainer

    flags = dict(backbone="test_resnet", mode="lora", lora_rank=2, lr=0.05)
    data = TinyTasks.make(n=16, batch_size=8)
    torch.manual_seed(0)
    module = create_taps_module(tasks=data.num_classes, **flags)
    trainer = cpu_trainer(tmp_path, max_epochs=1, precision=precision, limit_train_batches=2, limit_val_batches=1,
                          deterministic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    want = {"bf16-mixed": torch.float32, "bf16-true": torch.bfloat16, "64-true": torch.float64}[precision]
    assert {p.dtype for p in module.model.task_parameters()} == {want}
    path = tl.save_task(module.model, "a", tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = create_taps_module(tasks={"b": 3}, **flags).model.eval()
    assert tl.load_task(fresh, path) == "a"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got, merged = fresh(x, "a"), tl.merge(fresh, "a").eval()(x)
        ours = module.model.eval().float()(x, "a")
    torch.testing.assert_close(merged, got, rtol=1e-4, atol=1e-5)
    tolerance = 1e-5 if precision != "bf16-true" else 0.1  # the run's bf16 weights, rounded to float32 in the file
    torch.testing.assert_close(got, ours, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("flag, value", [("lam", 2.0), ("budget", 0.2), ("adapter_rank", 4), ("threshold", 0.3)])
def test_a_flag_of_another_mode_is_refused_by_name(flag, value):
    with pytest.raises(SettingsError, match=rf"--model.mode lora refuses flags it would not use:\n  - --model.{flag} "):
        create_taps_module(tasks={"a": 3}, backbone="test_resnet", mode="lora", **{flag: value})


def test_a_lora_task_file_is_refused_by_the_other_kind_and_by_other_settings(tmp_path):
    torch.manual_seed(0)
    model = tl.LoRAModel(timm.create_model("test_resnet", num_classes=0), {"a": 3}, rank=RANK, alpha=ALPHA)
    path = tl.save_task(model, "a", tmp_path / "a.safetensors")
    taps = tl.TapsModel(timm.create_model("test_resnet", num_classes=0), {"a": 3})
    with pytest.raises(tl.TaskFileError, match=r"a lora task file \(lora-task/1\), but this model is a TapsModel; "
                                               r"load it onto a LoRAModel \(--model.mode lora\)"):
        tl.load_task(taps, path)
    taps_file = tl.save_task(taps, "a", tmp_path / "taps.safetensors")
    with pytest.raises(tl.TaskFileError, match=r"a taps task file \(taps-task/1\), but this model is a LoRAModel"):
        tl.load_task(model, taps_file)
    for kwargs, named in ((dict(rank=4, alpha=ALPHA), "--model.lora_rank 2 \\(this model: 4\\)"),
                          (dict(rank=RANK, alpha=1.0), "--model.lora_alpha 3.0 \\(this model: 1.0\\)"),
                          (dict(rank=RANK, alpha=ALPHA, grouped_convs="full"), "--model.lora_grouped_convs frozen")):
        torch.manual_seed(0)
        other = tl.LoRAModel(timm.create_model("test_resnet", num_classes=0), {"a": 3}, **kwargs)
        state = copy.deepcopy(other.state_dict())
        with pytest.raises(tl.TaskFileError, match=f"trained with {named}"):
            tl.load_task(other, path)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())  # the model as it was


def test_a_vit_gets_lora_on_attention_qkv_and_proj_and_the_mlp_and_merges():
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=0)
    linears = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear)]
    model = tl.LoRAModel(vit, {"a": 3}).eval()
    assert set(linears) < set(model.lora_names) and model.grouped_names == []
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} <= set(model.lora_names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        x = torch.randn(2, 3, *vit.pretrained_cfg["input_size"][1:])
        merged = tl.merge(model, "a").eval()
        assert not any(isinstance(m, tl.TaskLayer) for m in merged.modules())
        torch.testing.assert_close(merged(x), model(x, "a"), rtol=1e-4, atol=1e-5)
        model.set_task(None)  # the shared backbone alone: the adapters change the output
        assert (model.heads["a"](model.forward_features(x)) - merged(x)).abs().max() > 1e-3
