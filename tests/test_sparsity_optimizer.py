"""prune_optimizer and schedules: wraps any optax optimizer, exact scheduled sparsity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_dnn import roles, sparsity as sp


def test_polynomial_schedule_matches_zhu_gupta():
  sched = sp.polynomial_schedule(0.1, 0.9, begin=10, end=110, power=3, frequency=10)
  assert float(sched(0)) == 0.0 and float(sched(9)) == 0.0
  for t in (10, 15, 20, 55, 109, 110, 500):
    tau = 10 + ((min(t, 110) - 10) // 10) * 10
    want = 0.9 + (0.1 - 0.9) * (1 - (tau - 10) / 100) ** 3
    assert abs(float(sched(t)) - want) < 1e-6, t
  assert float(sched(110)) == pytest.approx(0.9)
  assert float(jax.jit(sched)(jnp.int32(60))) == pytest.approx(float(sched(60)))


def test_constant_schedule_and_optax_composition():
  sched = sp.constant_schedule(0.5, begin=3)
  assert [float(sched(t)) for t in (0, 2, 3, 10)] == [0.0, 0.0, 0.5, 0.5]
  joined = optax.join_schedules([sp.constant_schedule(0.2), sp.constant_schedule(0.6)], [5])
  assert float(joined(4)) == pytest.approx(0.2) and float(joined(7)) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [dict(initial=0.0, final=1.0, begin=0, end=10),
                                 dict(initial=0.0, final=0.5, begin=10, end=10),
                                 dict(initial=0.0, final=0.5, begin=0, end=10, frequency=0)])
def test_schedule_bad_input(bad):
  with pytest.raises(ValueError):
    sp.polynomial_schedule(**bad)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                      "bias": jnp.zeros(8, jnp.float32)},
            "out": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)

  def loss(p):
    h = jax.nn.relu(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] - y) ** 2)

  return params, loss


def _run(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(params)
  return params, state, history


INNER = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INNER))
def test_wraps_any_optax_optimizer_with_exact_sparsity(name):
  params, loss = _problem()
  sched = sp.polynomial_schedule(0.0, 0.75, begin=0, end=20, frequency=5)
  tx = sp.prune_optimizer(INNER[name](), sched, update_every=5)
  final, state, history = _run(tx, params, loss, 31)
  masks = sp.masks_from_state(state)
  assert masks["dense"]["kernel"].dtype == jnp.bool_ and sp.is_dense(masks["dense"]["bias"])
  for path in (("dense", "kernel"), ("out", "kernel")):
    w = np.asarray(final[path[0]][path[1]])
    assert (w == 0).sum() == round(0.75 * w.size), path
    np.testing.assert_array_equal(w == 0, ~np.asarray(masks[path[0]][path[1]]))
  # apply_updates alone already yields masked params at every step.
  for p in history[20:]:
    assert (np.asarray(p["dense"]["kernel"]) == 0).sum() == 96
  assert float(loss(final)) < float(loss(params))


def test_masks_follow_the_schedule_over_time():
  params, loss = _problem(1)
  sched = sp.polynomial_schedule(0.0, 0.5, begin=0, end=10, frequency=1)
  tx = sp.prune_optimizer(optax.sgd(0.01), sched, update_every=1)
  _, _, history = _run(tx, params, loss, 12)
  for t, p in enumerate(history):
    want = round(float(sched(t)) * 128)
    assert (np.asarray(p["dense"]["kernel"]) == 0).sum() == want, t


def test_update_until_freezes_masks():
  params, loss = _problem(2)
  tx = sp.prune_optimizer(optax.adam(5e-2), sp.constant_schedule(0.5), update_every=1,
                          update_until=0)
  _, state0, hist = _run(tx, params, loss, 1)
  _, state, _ = _run(tx, params, loss, 15)
  np.testing.assert_array_equal(sp.masks_from_state(state)["dense"]["kernel"],
                                sp.masks_from_state(state0)["dense"]["kernel"])


@pytest.mark.parametrize("method,kw", [("random", {}), ("nm", dict(n=2, m=4)),
                                       ("channel", dict(rules=r"dense/kernel")),
                                       ("magnitude", dict(scope="global"))])
def test_other_methods(method, kw):
  params, loss = _problem(3)
  if method == "nm":   # the N:M axes are read off the traced loss (role, not position)
    kw = dict(kw, roles=roles.trace_roles(loss, params))
  tx = sp.prune_optimizer(optax.adam(1e-2), sp.constant_schedule(0.5), method=method,
                          update_every=3, **kw)
  final, state, _ = _run(tx, params, loss, 7)
  k = np.asarray(final["dense"]["kernel"])
  if method == "nm":
    assert ((k.reshape(4, 4, 8) != 0).sum(axis=1) == 2).all()
  elif method == "channel":
    assert ((k == 0).all(axis=0)).sum() == 4
    assert (np.asarray(final["dense"]["bias"])[(k == 0).all(axis=0)] == 0).all()
  elif method == "random":
    assert (k == 0).sum() == 64
  else:
    total = k.size + final["out"]["kernel"].size
    assert (k == 0).sum() + (np.asarray(final["out"]["kernel"]) == 0).sum() == round(0.5 * total)


def test_update_without_params_is_an_error():
  params, _ = _problem()
  tx = sp.prune_optimizer(optax.sgd(0.1), sp.constant_schedule(0.5))
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


def test_masks_from_state_without_prune_state():
  with pytest.raises(ValueError, match="PruneState"):
    sp.masks_from_state(optax.adam(1e-3).init({"w": jnp.ones(3)}))


def test_nm_divisibility_checked_at_init():
  params, loss = _problem()
  tx = sp.prune_optimizer(optax.sgd(0.1), sp.constant_schedule(0.5), method="nm", n=2, m=3,
                          roles=lambda p: roles.trace_roles(loss, p))
  with pytest.raises(ValueError, match="dense/kernel"):
    tx.init(params)


def test_nm_without_roles_or_axis_is_an_error():
  with pytest.raises(ValueError, match="roles=.*axis="):
    sp.prune_optimizer(optax.sgd(0.1), sp.constant_schedule(0.5), method="nm")


def test_target_reached_at_update_until_even_off_the_update_grid():
  params, loss = _problem(4)
  sched = sp.polynomial_schedule(0.0, 0.8, begin=0, end=7, frequency=1)
  tx = sp.prune_optimizer(optax.adam(1e-2), sched, update_every=5, update_until=7)
  final, _, history = _run(tx, params, loss, 9)
  assert (np.asarray(history[6]["dense"]["kernel"]) == 0).sum() == round(float(sched(5)) * 128)
  assert (np.asarray(final["dense"]["kernel"]) == 0).sum() == round(0.8 * 128)
