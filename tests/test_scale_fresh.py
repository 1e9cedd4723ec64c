"""No stale scale, ever: every way of calling the model reads the delta as it is at that call.

Each check compares the Propulsion model (fp32) against the conftest float64 reference, which
applies y * mean_i z_i**k with its own hooks: a submodule called on its own, a delta written in
place and through ``.data``, two backward passes, gradient accumulation, and activation
checkpointing in both modes (reentrant and non-reentrant).
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCH, base_model, loss_of, random_z, reference_model, rel_err, set_z, token_ids
from propulsion_ds import PropulsionConfig, inject
from propulsion_ds.method.propulsion import DELTA_NAME

LLAMA = ARCH["llama"]


def _pair(num_vectors=1, degree=7, seed=0):
    """(base, injected model, target names, z) with random z in the model."""
    base = base_model(LLAMA)
    model = copy.deepcopy(base)
    names = inject(model, PropulsionConfig(degree=degree, num_vectors=num_vectors))
    zs = random_z(base, names, num_vectors, seed=seed)
    set_z(model, zs)
    return base, model, names, zs


def _ref_grad(base, zs, degree, ids, submodule=False):
    """(float64 output, d loss / d z) of the reference for input ids."""
    ref, leaves = reference_model(base, zs, degree)
    out = _hidden_loss(ref.model(ids).last_hidden_state) if submodule else loss_of(ref(ids).logits, ids)
    out.backward()
    return out.detach(), torch.cat([leaves[n].grad for n in leaves], dim=1)


def _zs_of(model, like):
    """The model's current z per target (float64), split like ``like``."""
    delta = getattr(model, DELTA_NAME).detach().double()
    out, offset = {}, 0
    for n, z in like.items():
        out[n] = 1.0 + delta[:, offset:offset + z.shape[1]]
        offset += z.shape[1]
    return out


def _hidden_loss(h):
    # a fixed random projection (mean(h**2) would be ~constant after the final RMSNorm)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return (h.double() * w).sum()


def _grad(model):
    return getattr(model, DELTA_NAME).grad.double()


def _close(grad, ref, tol=1e-4):
    return ((grad - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_submodule_called_on_its_own_reads_the_current_delta(num_vectors):
    base, model, names, zs = _pair(num_vectors)
    ids = token_ids(base)
    model(ids)                                    # a root call first, with the first z
    zs2 = random_z(base, names, num_vectors, seed=5)
    set_z(model, zs2)
    # model.model(...) without the root: the scale must come from zs2, not the root call's zs
    for _ in range(2):                            # and a second backward must work
        getattr(model, DELTA_NAME).grad = None
        loss = _hidden_loss(model.model(ids).last_hidden_state)
        loss.backward()
        ref_loss, ref_grad = _ref_grad(base, zs2, 7, ids, submodule=True)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        assert _close(_grad(model), ref_grad)


@pytest.mark.parametrize("how", ["data-copy", "data-assign", "no-grad-copy"])
def test_delta_written_in_place_is_seen(how):
    base, model, names, zs = _pair()
    ids = token_ids(base)
    with torch.no_grad():
        model(ids)
    zs2 = random_z(base, names, 1, seed=9)
    new = torch.cat([z - 1.0 for z in zs2.values()], dim=1).float()
    delta = getattr(model, DELTA_NAME)
    version = delta._version
    if how == "data-copy":
        delta.data.copy_(new)                     # invisible to the version counter
        assert delta._version == version
    elif how == "data-assign":
        delta.data = new.clone()                  # what ZeRO-3 does when it gathers/partitions
    else:
        with torch.no_grad():
            delta.copy_(new)
    ref, _ = reference_model(base, zs2, 7)
    with torch.no_grad():   # the submodule first (no root call in between), then the root
        assert rel_err(model.model(ids).last_hidden_state, ref.model(ids).last_hidden_state) < 1e-5
        assert rel_err(model(ids).logits, ref(ids).logits) < 1e-5
    loss_of(model(ids).logits, ids).backward()
    _, ref_grad = _ref_grad(base, zs2, 7, ids)
    assert _close(_grad(model), ref_grad)


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_gradient_accumulation_over_two_backward_passes(num_vectors):
    base, model, names, zs = _pair(num_vectors)
    ids_a, ids_b = token_ids(base, seed=1), token_ids(base, seed=2)
    loss_of(model(ids_a).logits, ids_a).backward()
    loss_of(model(ids_b).logits, ids_b).backward()    # a second graph, same (unchanged) delta
    _, ga = _ref_grad(base, zs, 7, ids_a)
    _, gb = _ref_grad(base, zs, 7, ids_b)
    assert _close(_grad(model), ga + gb)


def test_two_forwards_then_two_backwards():
    # Both graphs alive at once (e.g. a chunked loss): each backward uses its own forward's scale.
    base, model, names, zs = _pair()
    ids_a, ids_b = token_ids(base, seed=1), token_ids(base, seed=2)
    la = loss_of(model(ids_a).logits, ids_a)
    lb = loss_of(model(ids_b).logits, ids_b)
    lb.backward()
    la.backward()
    _, ga = _ref_grad(base, zs, 7, ids_a)
    _, gb = _ref_grad(base, zs, 7, ids_b)
    assert _close(_grad(model), ga + gb)


def test_step_between_micro_batches_uses_the_new_delta():
    # forward, optimizer step (in place, no_grad), forward again: the second graph sees the step.
    base, model, names, zs = _pair()
    ids = token_ids(base)
    opt = torch.optim.SGD([getattr(model, DELTA_NAME)], lr=0.5)
    loss_of(model(ids).logits, ids).backward()
    opt.step()
    opt.zero_grad()
    zs2 = _zs_of(model, zs)
    loss = loss_of(model(ids).logits, ids)
    loss.backward()
    ref_loss, ref_grad = _ref_grad(base, zs2, 7, ids)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert _close(_grad(model), ref_grad)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("num_vectors", [1, 2])
def test_activation_checkpointing_matches_reference(reentrant, num_vectors):
    base, model, names, zs = _pair(num_vectors)
    model.train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        # Reentrant checkpointing only differentiates a segment whose input requires grad.
        model.enable_input_require_grads()
    ids_a, ids_b = token_ids(base, seed=1), token_ids(base, seed=2)
    loss_of(model(ids_a).logits, ids_a).backward()
    loss_of(model(ids_b).logits, ids_b).backward()    # accumulation under checkpointing too
    _, ga = _ref_grad(base, zs, 7, ids_a)
    _, gb = _ref_grad(base, zs, 7, ids_b)
    assert _close(_grad(model), ga + gb)
    # an in-place change between steps is seen by the recomputation as well
    zs2 = random_z(base, names, num_vectors, seed=4)
    set_z(model, zs2)
    getattr(model, DELTA_NAME).grad = None
    loss_of(model(ids_a).logits, ids_a).backward()
    _, g2 = _ref_grad(base, zs2, 7, ids_a)
    assert _close(_grad(model), g2)


def test_bf16_output_path_matches_reference():
    # A bf16 model: the scale is applied in fp32 out of place; the gradient still matches.
    base = base_model(LLAMA)
    model = copy.deepcopy(base).to(torch.bfloat16)
    names = inject(model, PropulsionConfig(degree=7))
    zs = random_z(base, names, 1)
    set_z(model, zs)
    ids = token_ids(base)
    loss_of(model(ids).logits, ids).backward()
    _, ref_grad = _ref_grad(base, _zs_of(model, zs), 7, ids)
    assert _close(_grad(model), ref_grad, tol=5e-2)   # bf16 weights and activations
