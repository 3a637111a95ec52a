"""``ModelTesterMixin``: the checks every model class of ``mcdm.models`` passes (diffusers' tester pattern).

A test class ``TestX(ModelTesterMixin)`` sets ``model_class`` and provides:

- ``init_kwargs()``: a tiny config (dict of ``model_class.__init__`` arguments);
- ``inputs(generator)``: the keyword arguments of one forward, drawn from ``generator``;
- ``forward(model, inputs)``: calls the model and returns the output tensor (default ``model(**inputs)``;
  override to pick ``.sample`` of a ``BaseOutput``, or to join a tuple);
- ``expected_shape``: the shape of that tensor;
- optionally ``prepare(model, **case)`` (after construction, e.g. ``freeze_for_stage``), ``trainable(model,
  **case)`` (the exact set of parameter names that must get a gradient; default: every parameter with
  ``requires_grad``) and ``loss(model, inputs)`` (default ``forward(...).float().pow(2).mean()``).

and inherits the shared tests: output shape, determinism (same inputs; same seed), the save / load round
trip through ``save_pretrained(safe_serialization=True)`` + ``load_strict``, and gradient flow to exactly
``trainable(model)``. ``case`` keywords (e.g. ``stage=3``) reach ``prepare`` and ``trainable`` through
``build(**case)`` / ``check_gradient_flow(**case)``, so a subclass can parametrize its gradient test.
"""
from __future__ import annotations

import json

import torch

from mcdm.models.loading import load_strict


# =============================================================================================
# helpers
# =============================================================================================
def wake_zero_initialised(model: torch.nn.Module, *markers: str, std: float = 0.1) -> list[str]:
    """Fill the zero-initialised parameters whose names contain one of ``markers`` with small noise.

    Layers that start as the identity (zero output projections of the denoiser's new attentions, adaLN-Zero
    gates, zero output heads / convs) block every gradient upstream of them at init: the parameters
    feeding them get a gradient that is exactly zero, although they are trained and do learn after the
    first optimiser step. The gradient-flow check asks for a non-zero gradient on every trainable
    parameter, so the testers give these layers small weights (as after some training) instead of
    accepting zero gradients. Each marked parameter must really be all zeros at init (checked here, so a
    changed init is noticed). The noise comes from the global RNG, which ``build`` seeds.
    """
    woken = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(marker in name for marker in markers):
                assert not param.any(), f"{name}: expected a zero-initialised parameter"
                param.normal_(0.0, std)
                woken.append(name)
    assert woken, f"no parameter matches {markers}"
    return woken


def make_distinctive(model: torch.nn.Module, seed: int = 1234) -> None:
    """Move every parameter and buffer away from its init (seeded), so a tensor that a load silently left
    at its init (or filled from another key) cannot equal the saved one by coincidence. Float buffers get a
    positive offset (running variances and standard deviations stay positive), integer buffers + 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g, dtype=param.dtype))
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.add_(0.01 + 0.1 * torch.rand(buf.shape, generator=g, dtype=buf.dtype))
            else:
                buf.add_(1)


def public_config(model) -> dict:
    """The saved config without diffusers' private keys, JSON-normalised (tuples and lists alike)."""
    return {k: v for k, v in json.loads(model.to_json_string()).items() if not k.startswith("_")}


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order; key by key the same dtype, shape and values (exactly)."""
    assert list(a) == list(b), (f"keys differ: only in the first {sorted(set(a) - set(b))[:5]}, "
                                f"only in the second {sorted(set(b) - set(a))[:5]}")
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{key}: dtype {a[key].dtype} vs {b[key].dtype}"
        assert a[key].shape == b[key].shape, f"{key}: shape {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
        assert torch.equal(a[key], b[key]), f"{key}: values differ"


# =============================================================================================
# the mixin
# =============================================================================================
class ModelTesterMixin:
    model_class: type = None
    seed: int = 0  # torch.manual_seed before construction (and prepare)
    input_seed: int = 1

    # ----------------------------------------------------------------------------- hooks
    def init_kwargs(self) -> dict:
        raise NotImplementedError

    def inputs(self, generator: torch.Generator) -> dict:
        raise NotImplementedError

    def forward(self, model, inputs: dict) -> torch.Tensor:
        return model(**inputs)

    @property
    def expected_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def prepare(self, model, **case) -> None:
        """Called after construction, under the same seed (e.g. ``freeze_for_stage``, waking zero inits)."""

    def trainable(self, model, **case) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def loss(self, model, inputs: dict) -> torch.Tensor:
        return self.forward(model, inputs).float().pow(2).mean()

    # ----------------------------------------------------------------------------- helpers
    def build(self, seed: int | None = None, **case):
        torch.manual_seed(self.seed if seed is None else seed)
        model = self.model_class(**self.init_kwargs())
        self.prepare(model, **case)
        return model

    def make_inputs(self) -> dict:
        return self.inputs(torch.Generator().manual_seed(self.input_seed))

    def eval_output(self, model, inputs: dict) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            out = self.forward(model, inputs)
        assert isinstance(out, torch.Tensor), f"forward hook returned {type(out).__name__}, not a tensor"
        return out

    # ----------------------------------------------------------------------------- shared tests
    def test_output_shape(self):
        out = self.eval_output(self.build(), self.make_inputs())
        assert tuple(out.shape) == tuple(self.expected_shape)
        assert torch.isfinite(out).all()

    def test_forward_is_deterministic(self):
        model, inputs = self.build(), self.make_inputs()
        first = self.eval_output(model, inputs)
        second = self.eval_output(model, inputs)
        assert torch.equal(first, second), f"max difference {(first - second).abs().max():.3g}"

    def test_same_seed_builds_the_same_model(self):
        a, b = self.build(), self.build()
        assert_state_dicts_equal(a.state_dict(), b.state_dict())
        inputs = self.make_inputs()
        out_a = self.eval_output(a, inputs)
        out_b = self.eval_output(b, inputs)
        assert torch.equal(out_a, out_b), f"same seed, max output difference {(out_a - out_b).abs().max():.3g}"
        if any(True for _ in a.parameters()):
            # another seed gives another output: the checks above are not vacuous (output ignoring weights)
            other = self.eval_output(self.build(seed=self.seed + 1), inputs)
            assert not torch.equal(out_a, other), "the output does not depend on the initial weights"

    def test_save_load_round_trip(self, tmp_path):
        model = self.build()
        make_distinctive(model)
        model.save_pretrained(tmp_path, safe_serialization=True)
        assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
        loaded = load_strict(self.model_class, tmp_path)
        assert type(loaded) is self.model_class and not loaded.training
        assert public_config(loaded) == public_config(model)
        assert_state_dicts_equal(model.state_dict(), loaded.state_dict())
        inputs = self.make_inputs()
        expected = self.eval_output(model, inputs)
        got = self.eval_output(loaded, inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    def test_gradient_flow(self):
        self.check_gradient_flow()

    def check_gradient_flow(self, loss=None, expected: set[str] | None = None, **case) -> set[str]:
        """Train mode, one backward of ``loss`` (default ``self.loss``): the parameters with a non-zero
        gradient are exactly ``expected`` (default ``trainable(model, **case)``); no frozen parameter has a
        gradient; every gradient is finite. Returns the names that got a gradient."""
        model = self.build(**case).train()
        if expected is None:
            expected = self.trainable(model, **case)
        requires = {name for name, p in model.named_parameters() if p.requires_grad}
        assert expected <= requires, f"must get a gradient but are frozen: {sorted(expected - requires)[:5]}"
        value = (loss or self.loss)(model, self.make_inputs())
        assert value.ndim == 0 and torch.isfinite(value), value
        if value.requires_grad:
            value.backward()
        params = dict(model.named_parameters())
        frozen_with_grad = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad, f"frozen parameters got a gradient: {frozen_with_grad[:5]}"
        non_finite = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not non_finite, f"non-finite gradients: {non_finite[:5]}"
        got = {n for n, p in params.items() if p.grad is not None and bool(p.grad.ne(0).any())}
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        assert not missing and not unexpected, (
            f"{len(missing)} parameters without a (non-zero) gradient, e.g. {missing[:6]}; "
            f"{len(unexpected)} with an unexpected one, e.g. {unexpected[:6]}")
        return got
