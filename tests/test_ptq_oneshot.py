"""One-shot pruning (Wanda, SparseGPT, magnitude): references, exact sparsity, N:M, masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_dnn import sparsity
from jaxopt_dnn.sparsity.oneshot import sparsegpt_solve


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(64, name="fc1")(x))
    h = nn.LayerNorm()(h)
    return nn.Dense(16, name="fc2")(h)


def _batches(n=3, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((24, 24)).astype(np.float32)
  scale = np.exp(rng.standard_normal(24)).astype(np.float32)      # outlier channels
  return [(jnp.asarray((rng.standard_normal((32, 24)) @ mix * 0.3
                        + rng.standard_normal((32, 24))).astype(np.float32) * scale),)
          for _ in range(n)]


@pytest.fixture(scope="module")
def mlp():
  model, b = Mlp(), _batches()
  return model, model.init(jax.random.key(0), b[0][0]), b


def test_wanda_mask_equals_reference_ranking(mlp):
  model, variables, batches = mlp
  params, masks = sparsity.oneshot(model.apply, variables, batches, method="wanda",
                                   sparsity=0.5, sequential=False)
  X = np.concatenate([np.asarray(b[0]) for b in batches])
  W = np.asarray(variables["params"]["fc1"]["kernel"])
  score = np.abs(W) * np.linalg.norm(X, axis=0)[:, None]
  ref = np.ones_like(W, bool)
  for j in range(W.shape[1]):
    ref[np.argsort(score[:, j], kind="stable")[:12], j] = False
  np.testing.assert_array_equal(np.asarray(masks["fc1"]["kernel"]), ref)
  np.testing.assert_array_equal(np.asarray(params["fc1"]["kernel"]), np.where(ref, W, 0))
  assert sparsity.is_dense(masks["fc1"]["bias"]) and sparsity.is_dense(masks["LayerNorm_0"]["scale"])
  assert params["fc1"]["bias"] is variables["params"]["fc1"]["bias"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_exact_sparsity_and_nm(mlp, method):
  model, variables, batches = mlp
  p, mk = sparsity.oneshot(model.apply, variables, batches, method=method, sparsity=0.5)
  for name, k in (("fc1", 24), ("fc2", 64)):
    keep = np.asarray(mk[name]["kernel"])
    assert (~keep).sum() == round(0.5 * k) * keep.shape[1]
    assert (~keep).sum(0).tolist() == [round(0.5 * k)] * keep.shape[1]   # per output column
    assert np.all(np.asarray(p[name]["kernel"])[~keep] == 0)
  sparsity.check_mask_tree(p, mk)
  p, mk = sparsity.oneshot(model.apply, variables, batches, method=method, n=2, m=4)
  for name in ("fc1", "fc2"):
    keep = np.asarray(mk[name]["kernel"])
    groups = keep.reshape(-1, 4, keep.shape[1]).sum(1)      # along the contraction axis
    assert np.all(groups == 2)
    assert np.all(np.asarray(p[name]["kernel"])[~keep] == 0)


def sparsegpt_reference(W, H, s, B, damp=0.01):
  """Column-by-column SparseGPT in float64 (per-output exact count per block)."""
  W = W.astype(np.float64).T.copy()
  H = H.astype(np.float64) + damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  K = W.shape[1]
  keep = np.ones_like(W, bool)
  for i1 in range(0, K, B):
    i2 = min(i1 + B, K)
    kb = int(np.round(s * i2) - np.round(s * i1))
    sc = W[:, i1:i2] ** 2 / np.diag(U)[i1:i2] ** 2
    for r in range(W.shape[0]):
      keep[r, i1 + np.argsort(sc[r], kind="stable")[:kb]] = False
    for i in range(i1, i2):
      q = np.where(keep[:, i], W[:, i], 0.0)
      err = (W[:, i] - q) / U[i, i]
      W[:, i:] -= np.outer(err, U[i, i:])
      W[:, i] = q
  return W.T, keep.T


def _correlated_problem(rng, rows: int, k: int, n: int, *, mix: float):
  """Calibration rows ``X (rows, k)`` with correlated inputs (``Z A * mix + noise``) and a
  kernel ``W (k, n)``: the least-squares pruning problem ``min ||X W - X W'||``."""
  X = (rng.standard_normal((rows, k)) @ rng.standard_normal((k, k)) * mix
       + rng.standard_normal((rows, k))).astype(np.float32)
  return X, rng.standard_normal((k, n)).astype(np.float32)


def test_sparsegpt_matches_reference_and_beats_wanda():
  rng = np.random.default_rng(2)
  k, n = 96, 20
  X, W = _correlated_problem(rng, 400, k, n, mix=0.3)
  H = 2.0 * X.T.astype(np.float64) @ X
  new, keep = sparsegpt_solve(jnp.asarray(W), jnp.asarray(H, jnp.float32), sparsity=0.5,
                              block_size=32)
  rw, rk = sparsegpt_reference(W, H, 0.5, 32)
  assert np.mean(np.asarray(keep) != rk) < 0.01
  np.testing.assert_allclose(np.asarray(new), rw, atol=2e-3)
  wanda = np.abs(W) * np.linalg.norm(X, axis=0)[:, None]
  wk = np.ones_like(W, bool)
  for j in range(n):
    wk[np.argsort(wanda[:, j], kind="stable")[:48], j] = False
  err = lambda d: np.sum((X @ W - X @ d) ** 2)  # noqa: E731
  assert err(np.asarray(new)) < 0.8 * err(np.where(wk, W, 0))


@pytest.mark.slow
def test_masks_work_with_prune_optimizer_and_pack(mlp):
  model, variables, batches = mlp
  p, mk = sparsity.oneshot(model.apply, variables, batches, method="sparsegpt", n=2, m=4)
  tx = sparsity.prune_optimizer(optax.sgd(0.1), sparsity.constant_schedule(0.5),
                                update_until=-1)           # never recompute: keep these
  state = tx.init(p)._replace(masks=mk)
  x = batches[0][0]
  loss = lambda q: jnp.mean(model.apply({"params": q}, x) ** 2)  # noqa: E731
  for _ in range(3):
    g = jax.grad(loss)(p)
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  keep = np.asarray(mk["fc1"]["kernel"])
  assert np.all(np.asarray(p["fc1"]["kernel"])[~keep] == 0)
  np.testing.assert_array_equal(np.asarray(sparsity.apply_masks(p, mk)["fc2"]["kernel"]),
                                np.asarray(p["fc2"]["kernel"]))
  packed = sparsity.pack(p, mk)
  assert sparsity.tree_bytes(packed) < sparsity.tree_bytes(p)


def test_oneshot_bad_args(mlp):
  model, variables, batches = mlp
  with pytest.raises(ValueError, match="method"):
    sparsity.oneshot(model.apply, variables, batches, method="obs")
  with pytest.raises(ValueError, match="sparsity"):
    sparsity.oneshot(model.apply, variables, batches, sparsity=1.5)
  with pytest.raises(ValueError, match="n and m"):
    sparsity.oneshot(model.apply, variables, batches, n=2)
  with pytest.raises(ValueError, match="m=5"):
    sparsity.oneshot(model.apply, variables, batches, n=2, m=5)
  with pytest.raises(ValueError, match="nothing"):
    sparsity.oneshot(model.apply, variables, batches, rules=["nothing"])
  # a chosen leaf that no contraction consumes: every capture path names it
  for kw in ({}, {"method": "sparsegpt", "bias_correct": True},
             {"method": "sparsegpt", "float_targets": True}):
    with pytest.raises(ValueError, match="oneshot: no kernel chosen"):
      sparsity.oneshot(model.apply, variables, batches, rules=[r"fc1/bias"], **kw)


@pytest.mark.slow
def test_float_target_is_the_kernel_when_inputs_agree_and_fits_float_outputs():
  from jaxopt_dnn.sparsity.oneshot import float_target
  rng = np.random.default_rng(0)
  xq = jnp.asarray(rng.standard_normal((256, 24)), jnp.float32)
  # the float inputs: a linear distortion of the pruned model's (fittable by the kernel)
  xf = xq @ (jnp.eye(24) + 0.2 * jnp.asarray(rng.standard_normal((24, 24)), jnp.float32))
  w = jnp.asarray(rng.standard_normal((24, 8)), jnp.float32)
  h = 2 * xq.T @ xq
  same = float_target(w, h, jnp.zeros_like(h), 0.1)
  np.testing.assert_allclose(same, w, rtol=1e-6, atol=1e-6)
  wt = float_target(w, h, 2 * xq.T @ (xf - xq), 0.01)
  err = lambda v: float(jnp.sum((xf @ w - xq @ v) ** 2))  # noqa: E731
  assert err(wt) < 0.05 * err(w)          # towards the float model's outputs
  model, b = Mlp(), _batches()
  v = model.init(jax.random.key(0), b[0][0])
  for ft in (False, True):
    p, m = sparsity.oneshot(model.apply, v, b, method="sparsegpt", n=2, m=4, float_targets=ft)
    k = np.asarray(p["fc2"]["kernel"])
    assert np.all((k.reshape(-1, 4, k.shape[1]) != 0).sum(1) <= 2)


def test_sparsegpt_nm_obs_selection_is_2_4_and_fits_better():
  rng = np.random.default_rng(3)
  k, n = 64, 24
  X, W = _correlated_problem(rng, 300, k, n, mix=0.5)
  H = jnp.asarray(2.0 * X.T.astype(np.float64) @ X, jnp.float32)
  err = lambda d: np.sum((X @ W - X @ np.asarray(d)) ** 2)  # noqa: E731
  out = {}
  for sel in ("score", "obs"):
    new, keep = sparsegpt_solve(jnp.asarray(W), H, n=2, m=4, block_size=32, nm_select=sel)
    keep = np.asarray(keep)
    assert np.all(keep.reshape(-1, 4, n).sum(1) == 2)
    assert np.all(np.asarray(new)[~keep] == 0)
    out[sel] = err(new)
  assert out["obs"] < out["score"]
  with pytest.raises(ValueError, match="nm_select"):
    model, b = Mlp(), _batches(1)
    sparsity.oneshot(model.apply, model.init(jax.random.key(0), b[0][0]), b,
                     method="sparsegpt", n=2, m=4, nm_select="best")


def _damped_loss(W, H, damp):
  """``(w' - w)^T (H + lambda I) (w' - w)`` summed over output columns (float64)."""
  Hd = np.asarray(H, np.float64) + damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
  return lambda d: float(np.sum((np.asarray(d, np.float64) - W) * (Hd @ (np.asarray(d, np.float64) - W))))


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n=2, m=4, nm_select="obs")])
def test_sparsegpt_refit_is_the_masked_least_squares_optimum(kw):
  from jaxopt_dnn.sparsity.oneshot import refit_masked
  rng = np.random.default_rng(4)
  k, n = 48, 12
  X, W = _correlated_problem(rng, 200, k, n, mix=0.5)
  H = 2.0 * X.T.astype(np.float64) @ X
  loss = _damped_loss(W, H, 0.01)
  sweep, keep = sparsegpt_solve(jnp.asarray(W), jnp.asarray(H, jnp.float32), block_size=16,
                                **kw)
  new, keep2 = sparsegpt_solve(jnp.asarray(W), jnp.asarray(H, jnp.float32), block_size=16,
                               refit=True, **kw)
  keep = np.asarray(keep)
  np.testing.assert_array_equal(np.asarray(keep2), keep)          # same mask
  assert np.all(np.asarray(new)[~keep] == 0)
  # float64 reference: each column's kept weights solve H_SS w_S = (H w)_S (damped H)
  Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(k)
  ref = np.zeros_like(W, np.float64)
  for j in range(n):
    s = np.flatnonzero(keep[:, j])
    ref[s, j] = np.linalg.solve(Hd[np.ix_(s, s)], (Hd @ W[:, j])[s])
  np.testing.assert_allclose(np.asarray(new), ref, rtol=1e-3, atol=1e-3)
  assert loss(new) < 0.95 * loss(sweep)
  # the refit alone (from the masked kernel; CG converges in K steps)
  Hd32 = jnp.asarray(Hd, jnp.float32)
  again = refit_masked(jnp.asarray(W), Hd32, jnp.asarray(keep), iters=k)
  np.testing.assert_allclose(np.asarray(again), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_sparsegpt_act_order_visits_by_hessian_diagonal(kw):
  """act_order is the same sweep on the inputs permuted by descending H_ii (N:M: whole
  groups by their sum), mapped back."""
  rng = np.random.default_rng(5)
  k, n = 32, 8
  X, W = _correlated_problem(rng, 200, k, n, mix=0.5)
  X = X * np.exp(rng.standard_normal(k)).astype(np.float32)          # uneven diagonal
  H = (2.0 * X.T.astype(np.float64) @ X).astype(np.float32)
  d = np.diag(H)
  if "n" in kw:
    g = np.argsort(-d.reshape(-1, 4).sum(1), kind="stable")
    perm = (g[:, None] * 4 + np.arange(4)).reshape(-1)
  else:
    perm = np.argsort(-d, kind="stable")
  assert not np.array_equal(perm, np.arange(k))
  new, keep = sparsegpt_solve(jnp.asarray(W), jnp.asarray(H), block_size=8, act_order=True,
                              **kw)
  pn, pk = sparsegpt_solve(jnp.asarray(W[perm]), jnp.asarray(H[np.ix_(perm, perm)]),
                           block_size=8, **kw)
  inv = np.argsort(perm)
  np.testing.assert_array_equal(np.asarray(keep), np.asarray(pk)[inv])
  np.testing.assert_allclose(np.asarray(new), np.asarray(pn)[inv], rtol=1e-4, atol=1e-4)
  if "n" in kw:
    assert np.all(np.asarray(keep).reshape(-1, 4, n).sum(1) == 2)   # the kernel's groups
  plain, _ = sparsegpt_solve(jnp.asarray(W), jnp.asarray(H), block_size=8, **kw)
  assert not np.allclose(np.asarray(plain), np.asarray(new))


def test_oneshot_passes_refit_and_act_order(mlp):
  model, variables, batches = mlp
  base, mk0 = sparsity.oneshot(model.apply, variables, batches, method="sparsegpt", n=2, m=4,
                               sequential=False, refit=False)
  for kw in (dict(refit=True), dict(refit=False, act_order=True)):
    p, mk = sparsity.oneshot(model.apply, variables, batches, method="sparsegpt", n=2, m=4,
                             sequential=False, **kw)
    keep = np.asarray(mk["fc1"]["kernel"])
    assert np.all(keep.reshape(-1, 4, keep.shape[1]).sum(1) == 2)
    assert np.all(np.asarray(p["fc1"]["kernel"])[~keep] == 0)
    assert not np.allclose(np.asarray(p["fc1"]["kernel"]), np.asarray(base["fc1"]["kernel"]))


def test_oneshot_bias_correct_centres_the_hessian_and_folds_the_mean_shift():
  """One Dense layer on inputs with a large mean: bias_correct prunes with the centred
  Hessian and moves the mean output shift into the bias, so its fit is better than the
  plain SparseGPT fit (which spends the Hessian on the mean direction)."""
  rng = np.random.default_rng(6)
  k, n = 32, 16
  X, _ = _correlated_problem(rng, 300, k, n, mix=0.5)
  X = X + 4.0 * rng.standard_normal(k).astype(np.float32)            # a mean offset
  model = nn.Dense(n)
  v = model.init(jax.random.key(1), X[:2])
  b = [(jnp.asarray(X[i:i + 100]),) for i in range(0, 300, 100)]
  ref = np.asarray(model.apply(v, X))
  err = {}
  for bc in (False, True):
    p, mk = sparsity.oneshot(model.apply, v, b, method="sparsegpt", n=2, m=4,
                             bias_correct=bc)
    keep = np.asarray(mk["kernel"])
    assert np.all(keep.reshape(-1, 4, n).sum(1) == 2)
    assert np.all(np.asarray(p["kernel"])[~keep] == 0)
    err[bc] = float(np.sum((np.asarray(model.apply({"params": p}, X)) - ref) ** 2))
    if bc:
      Xc = X - X.mean(0)
      new, kp = sparsegpt_solve(v["params"]["kernel"], jnp.asarray(2.0 * Xc.T @ Xc),
                                n=2, m=4, damp=0.3, nm_select="obs", refit=True)
      np.testing.assert_array_equal(np.asarray(kp), keep)
      np.testing.assert_allclose(np.asarray(p["kernel"]), np.asarray(new), rtol=2e-3,
                                 atol=2e-3)
      shift = X.mean(0) @ (np.asarray(v["params"]["kernel"]) - np.asarray(new))
      np.testing.assert_allclose(np.asarray(p["bias"]),
                                 np.asarray(v["params"]["bias"]) + shift, rtol=2e-3,
                                 atol=2e-3)
    else:
      assert p["bias"] is v["params"]["bias"]
  assert err[True] < 0.9 * err[False]
  with pytest.raises(ValueError, match="bias_correct"):
    sparsity.oneshot(model.apply, v, b, method="wanda", bias_correct=True)
