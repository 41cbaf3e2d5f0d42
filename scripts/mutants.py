"""The hand-written mutants of ``scripts/mutation_check.py``: each one exact
snippet of one file, its replacement, the bug it stands for and the tests
that must catch it."""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    why: str  # the bug it stands for
    tests: Tuple[str, ...]  # pytest targets of the suite as it was that must catch it (files or node ids)
    added: Tuple[str, ...] = ()  # tests added for it (tests/test_mutation_catches.py, test_resume_fresh_process.py)

    def targets(self, before: bool = False) -> Tuple[str, ...]:
        return self.tests if before else self.tests + self.added


def M(name, file, old, new, why, *tests, added=()):
    return Mutant(name, file, old, new, why, tuple(tests), tuple([added] if isinstance(added, str) else added))


# Test targets, kept focused so each mutant runs in well under a minute.
T = "tests/"
LOSSES = T + "test_losses.py"
PPO_V = T + "test_ppo_values.py"
PPO_VALUES = (PPO_V + "::test_rollout_trajectory_and_time_limit_bootstrap_by_hand",
              PPO_V + "::test_update_targets_use_gamma", PPO_V + "::test_update_targets_use_gae_lambda",
              PPO_V + "::test_update_targets_bootstrap_only_at_the_time_limit",
              PPO_V + "::test_advantages_are_normalised_in_the_loss",
              PPO_V + "::test_advantages_raw_when_normalisation_is_off",
              PPO_V + "::test_normalize_obs_bootstraps_from_the_normalised_final_obs")
WRAP = T + "test_wrappers_values.py"
ENVS = T + "test_envs.py"
OPEN = (T + "test_open_transcription.py", T + "test_open.py")
O4RL = (T + "test_optim4rl_transcription.py", T + "test_optim4rl.py")
KFAC = T + "test_kfac.py::"
SECOND = (T + "test_second_order_values.py", KFAC + "test_factors_equal_exact_kronecker_factors_and_ema",
          KFAC + "test_step_equals_dense_damped_kronecker_solve", KFAC + "test_large_damping_tends_to_gradient_over_damping",
          KFAC + "test_singular_curvature_tiny_damping_is_finite", KFAC + "test_non_finite_stats_and_damping_are_contained",
          KFAC + "test_inverse_refresh_exactly_every_period", KFAC + "test_norm_constraint_bounds_the_step",
          KFAC + "test_diag_ggn_equals_diagonal_of_dense_empirical_fisher")
ES_V = T + "test_es_values.py"
PBT_F = T + "test_pbt_fidelity.py"
PBT = T + "test_pbt.py::"
PBT_TRUNC = (PBT_F + "::test_truncation_constants_as_jaderberg_and_ray",
             PBT_F + "::test_copier_record_restarts_and_it_sits_out_until_new_evidence",
             PBT + "test_truncation_select_bottom_copies_top", PBT + "test_truncation_copies_exact_members_before_explore",
             PBT + "test_nan_member_always_replaced_never_source")
PBT_TTEST = (PBT_F + "::test_ttest_sees_variance_and_alpha_matters", PBT + "test_welch_pvalue_matches_scipy",
             PBT + "test_ttest_picks_only_significantly_better", PBT + "test_nan_member_always_replaced_never_source")
PBT_WINDOW = (PBT_F + "::test_push_episodes_keeps_only_finished_episodes_in_order",
              PBT_F + "::test_window_holds_finished_episode_returns_not_carried_values",
              PBT_F + "::test_copier_record_restarts_and_it_sits_out_until_new_evidence", *PBT_TTEST)
PBT_PAIR = (PBT + "test_tournament_copies_only_strictly_better", *PBT_TTEST)
PBT_EXPLORE = (PBT_F + "::test_resample_redraws_from_the_prior_and_the_mix_is_rays",
               PBT + "test_perturb_and_resample_stay_in_bounds_and_change_only_replaced",
               PBT + "test_log1m_perturbs_one_minus_gamma")
STATS = T + "test_stats_values.py"
CATCH = T + "test_mutation_catches.py"
RESUME = T + "test_resume_fresh_process.py"


def _c(name):
    """A test of tests/test_mutation_catches.py (added for the first run's survivors)."""
    return f"{CATCH}::{name}"


MUTANTS: List[Mutant] = [
    # --- agents/losses.py: GAE and the PPO loss -------------------------------------------------
    M("gae_bootstraps_through_terminal", "agents/losses.py",
      "deltas = rewards + gamma * next_values * not_done - values",
      "deltas = rewards + gamma * next_values - values",
      "dropped term: V(next) is bootstrapped across an episode end", LOSSES, *PPO_VALUES),
    M("gae_trace_not_cut_at_done", "agents/losses.py",
      "adv = delta + gamma * lam * nd * carry", "adv = delta + gamma * lam * carry",
      "dropped term: the advantage trace runs on into the next episode", LOSSES, *PPO_VALUES),
    M("surrogate_max_not_min", "agents/losses.py",
      "surrogate = jnp.minimum(", "surrogate = jnp.maximum(",
      "wrong bound: the optimistic instead of the pessimistic clipped surrogate", LOSSES, *PPO_VALUES),
    M("value_loss_min_not_max", "agents/losses.py",
      "0.5 * jnp.maximum((value - targets) ** 2, (clipped - targets) ** 2)",
      "0.5 * jnp.minimum((value - targets) ** 2, (clipped - targets) ** 2)",
      "wrong bound in the clipped value loss", LOSSES, *PPO_VALUES),
    M("clip_value_flag_ignored", "agents/losses.py",
      "    if clip_value:\n", "    if True:\n",
      "a setting ignored: clip_value=False still clips the value loss", LOSSES, *PPO_VALUES,
      added=_c("test_ppo_loss_clip_value_off_is_the_plain_squared_error")),
    M("approx_kl_k1_estimator", "agents/losses.py",
      '"approx_kl": ((ratio - 1.0) - log_ratio).mean()', '"approx_kl": (-log_ratio).mean()',
      "wrong formula: k1 (-log r) instead of the k3 estimator (r - 1) - log r of the logged KL", LOSSES, *PPO_VALUES,
      added=_c("test_ppo_loss_approx_kl_and_clip_fraction_values")),
    # --- agents/ppo.py ------------------------------------------------------------------------------
    M("bootstrap_from_post_reset_obs", "agents/ppo.py",
      '                info["final_obs"],\n', "                next_obs,\n",
      "wrong variable: the time-limit bootstrap reads the post-reset observation", *PPO_VALUES),
    M("done_is_terminated_only", "agents/ppo.py",
      "done=jnp.logical_or(terminated, truncated),", "done=terminated,",
      "dropped term: truncated steps do not end the GAE trace", *PPO_VALUES),
    M("last_value_of_last_stored_obs", "agents/ppo.py",
      'last_value = ac.value(state.params["critic"], state.obs)',
      'last_value = ac.value(state.params["critic"], traj["obs"][-1])',
      "off by one: the bootstrap after the rollout uses the last stored obs, not the next one", *PPO_VALUES),
    M("train_fraction_off_by_one", "agents/ppo.py",
      "train_fraction = state.update_step.astype(jnp.float32) / config.num_updates",
      "train_fraction = (state.update_step + 1).astype(jnp.float32) / config.num_updates",
      "off by one: the training proportion is one iteration ahead",
      T + "test_ppo.py::test_layer_stats_and_context_reach_optimizers_that_ask",
      T + "test_ppo.py::test_anneal_lr_steps_at_the_annealed_rate_and_keeps_the_base"),
    M("batch_fraction_over_epochs", "agents/ppo.py",
      "epoch.astype(jnp.float32) / max(config.update_epochs - 1, 1)",
      "epoch.astype(jnp.float32) / config.update_epochs",
      "off by one: the batch proportion never reaches 1 on the last epoch",
      T + "test_ppo.py::test_layer_stats_and_context_reach_optimizers_that_ask"),
    M("reward_norm_gamma_ignored", "agents/ppo.py",
      "NormalizeReward(vec_env, config.reward_norm_gamma)", "NormalizeReward(vec_env)",
      "a setting ignored: reward_norm_gamma falls back to the wrapper's 0.99",
      T + "test_baselines.py::test_brax_preset_normalises_rewards_like_purejaxrl",
      added=_c("test_ppo_reward_normalisation_uses_reward_norm_gamma")),
    # --- envs/wrappers.py -------------------------------------------------------------------------
    M("final_obs_with_previous_stats", "envs/wrappers.py",
      'info = {**info, "final_obs": rms.normalize(info["final_obs"], self.clip)}',
      'info = {**info, "final_obs": state.obs_rms.normalize(info["final_obs"], self.clip)}',
      "off by one step: final_obs normalised with the statistics before this step", WRAP),
    M("final_obs_not_normalised", "envs/wrappers.py",
      '        if "final_obs" in info:\n', '        if False:\n',
      "dropped step: final_obs left raw while obs are normalised", WRAP,
      PPO_V + "::test_normalize_obs_bootstraps_from_the_normalised_final_obs"),
    M("rms_drops_between_batch_term", "envs/wrappers.py",
      "m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total",
      "m2 = self.var * self.count + b_var * b_count",
      "dropped term of Chan's parallel variance", WRAP, ENVS + "::test_normalize_observation_running_stats"),
    M("normalize_reward_no_reset_at_done", "envs/wrappers.py",
      "returns = state.returns * self.gamma * (1.0 - done) + reward",
      "returns = state.returns * self.gamma + reward",
      "dropped term: the discounted return is not reset at episode ends",
      T + "test_baselines.py::test_normalize_reward_matches_purejaxrl_formula"),
    M("autoreset_final_obs_after_reset", "envs/wrappers.py",
      'info = {**info, "final_obs": obs}', 'info = {**info, "final_obs": new_obs}',
      "wrong variable: final_obs is the first obs of the next episode",
      ENVS + "::test_auto_reset_keeps_final_obs", PPO_V + "::test_rollout_trajectory_and_time_limit_bootstrap_by_hand"),
    # --- learned_optim/open.py, features.py ---------------------------------------------------------
    M("open_mean_not_removed", "learned_optim/open.py",
      "        step = step - jnp.mean(step)\n", "        step = step\n",
      "dropped step: the mean over all elements is not subtracted", *OPEN),
    M("open_train_batch_fraction_swapped", "learned_optim/open.py",
      "            jnp.broadcast_to(ctx.train_fraction, (1, n)).astype(jnp.float32),\n"
      "            jnp.asarray(layout.layer_prop, jnp.float32)[None],\n"
      "            jnp.broadcast_to(ctx.batch_fraction, (1, n)).astype(jnp.float32),\n",
      "            jnp.broadcast_to(ctx.batch_fraction, (1, n)).astype(jnp.float32),\n"
      "            jnp.asarray(layout.layer_prop, jnp.float32)[None],\n"
      "            jnp.broadcast_to(ctx.train_fraction, (1, n)).astype(jnp.float32),\n",
      "swapped inputs: training and batch proportion features exchanged", *OPEN),
    M("open_log_eps_1e8", "learned_optim/open.py",
      "    logm = jnp.log(jnp.abs(m) + LOG_EPS)", "    logm = jnp.log(jnp.abs(m) + 1e-8)",
      "wrong constant: log(|m| + 1e-8) instead of OPEN's 1e-13", *OPEN),
    M("momenta_betas_swapped", "learned_optim/features.py",
      "return b * m + (1.0 - b) * jnp.expand_dims(g.astype(jnp.float32), axis)",
      "return (1.0 - b) * m + b * jnp.expand_dims(g.astype(jnp.float32), axis)",
      "swapped weights of the momentum EMA", *OPEN),
    M("dormancy_not_times_width", "learned_optim/features.py",
      "return a / jnp.sum(jnp.abs(a)) * a.shape[-1]", "return a / jnp.sum(jnp.abs(a))",
      "dropped factor: dormancy relative to the layer sum, not the mean", *OPEN),
    # --- learned_optim/optim4rl.py --------------------------------------------------------------
    M("optim4rl_no_grad_clip", "learned_optim/optim4rl.py",
      "g = jnp.clip(g, -grad_clip, grad_clip)[None]", "g = g[None]",
      "a setting ignored: the gradient is not clipped", *O4RL),
    M("optim4rl_eps_outside_sqrt", "learned_optim/optim4rl.py",
      "jax.lax.rsqrt(jnp.exp(log_v) + eps)", "1.0 / (jnp.sqrt(jnp.exp(log_v)) + eps)",
      "wrong constant placement: eps outside the square root", *O4RL),
    M("optim4rl_v_branch_sees_abs_g", "learned_optim/optim4rl.py",
      "cv = gru_cell(gru_v, state.carry_v, jnp.square(g))", "cv = gru_cell(gru_v, state.carry_v, jnp.abs(g))",
      "wrong input: the v branch sees |g| instead of g^2", *O4RL),
    M("optim4rl_eps_setting_ignored", "learned_optim/optim4rl.py",
      "scale_by_optim4rl(meta_params, self.hidden_size, self.grad_clip, self.eps)",
      "scale_by_optim4rl(meta_params, self.hidden_size, self.grad_clip)",
      "a setting ignored: Optim4RLRule(eps=...) does not reach the transform", *O4RL,
      added=_c("test_optim4rl_rule_eps_reaches_the_update")),
    # --- learned_optim/kfac.py, diag_ggn.py, curvature.py, second_order.py -------------------------
    M("kfac_negative_eigvals_kept", "learned_optim/kfac.py",
      "    sa = jnp.maximum(ls.a_eigvals, 0.0)\n", "    sa = ls.a_eigvals\n",
      "dropped clip: negative eigenvalues of A (rounding) enter the denominator", *SECOND),
    M("kfac_pi_inverted", "learned_optim/kfac.py",
      "pi = jnp.sqrt(mean_a / jnp.maximum(mean_g, 1e-30))", "pi = jnp.sqrt(mean_g / jnp.maximum(mean_a, 1e-30))",
      "inverted ratio in Martens & Grosse's pi", *SECOND),
    M("kfac_refresh_off_by_one", "learned_optim/kfac.py",
      "due = (state.count % period) == 0", "due = ((state.count + 1) % period) == 0",
      "off by one: eigendecompositions at steps T-1, 2T-1, ... (none at step 0)", *SECOND),
    M("min_damping_ignored", "learned_optim/second_order.py",
      "lam = jnp.maximum(jnp.asarray(damping, jnp.float32), jnp.float32(min_damping))",
      "lam = jnp.asarray(damping, jnp.float32)",
      "a setting ignored: min_damping does not bound the damping", *SECOND,
      added=_c("test_min_damping_bounds_a_smaller_damping")),
    M("diag_ggn_square_of_mean", "learned_optim/diag_ggn.py",
      "batch = jnp.square(a).T @ jnp.square(g) / a.shape[0]",
      "batch = jnp.square(a.T @ g / a.shape[0])",
      "wrong formula: the square of the mean gradient (empirical) instead of the per-example Fisher diagonal",
      *SECOND),
    M("diag_ggn_sqrt_mode_ignored", "learned_optim/diag_ggn.py",
      'curv = fisher if mode == "natural" else jnp.sqrt(fisher)', "curv = fisher",
      "a setting ignored: mode='sqrt' behaves like 'natural'", *SECOND),
    # --- meta/es.py --------------------------------------------------------------------------------
    M("es_tells_fitness_not_minus", "meta/es.py",
      "algo.tell(k_tell, pop, -fitness, es_state, algo_params)",
      "algo.tell(k_tell, pop, fitness, es_state, algo_params)",
      "wrong sign: evosax minimises, so the ES descends on fitness", ES_V),
    M("es_antithetic_ignored", "meta/es.py",
      'kwargs["use_antithetic_sampling"] = config.antithetic', 'kwargs["use_antithetic_sampling"] = True',
      "a setting ignored: antithetic=False still mirrors", ES_V),
    M("es_same_key_every_generation", "meta/es.py",
      "key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.generation)",
      "key = jax.random.wrap_key_data(state.key)",
      "dropped fold_in: every generation draws the same perturbations", ES_V,
      added=_c("test_es_generations_draw_fresh_perturbations")),
    M("es_reference_sign_kept", "meta/es.py",
      "reference = jnp.asarray(np.maximum(np.abs(np.asarray(reference_returns, np.float32)), 1e-6))",
      "reference = jnp.asarray(np.maximum(np.asarray(reference_returns, np.float32), 1e-6))",
      "dropped abs: a negative reference return (Pendulum) becomes 1e-6",
      T + "test_es.py::test_nan_candidates_get_worst_fitness",
      added=_c("test_es_fitness_per_env_seed_mean_over_abs_reference")),
    M("es_fitness_mean_over_envs_axis", "meta/es.py",
      "        per_env = returns.mean(-1)\n", "        per_env = returns.mean(-2)\n",
      "wrong axis: the mean over envs instead of over seeds",
      T + "test_es.py::test_nan_candidates_get_worst_fitness",
      added=_c("test_es_fitness_per_env_seed_mean_over_abs_reference")),
    # --- meta/pbt/exploit.py, explore.py -----------------------------------------------------------
    M("window_valid_off_by_one", "meta/pbt/exploit.py",
      "    valid = jnp.arange(w)[None, :] >= (w - counts[:, None])\n    n = jnp.maximum(",
      "    valid = jnp.arange(w)[None, :] > (w - counts[:, None])\n    n = jnp.maximum(",
      "off by one: the oldest valid return in the window is dropped", *PBT_WINDOW,
      added=_c("test_member_fitness_is_the_mean_of_the_last_counts_entries")),
    M("truncation_bottom_off_by_one", "meta/pbt/exploit.py",
      "bottom = eligible & (rank < n_cut)", "bottom = eligible & (rank <= n_cut)",
      "off by one: one member too many is replaced", *PBT_TRUNC),
    M("truncation_floor", "meta/pbt/exploit.py",
      "jnp.clip(jnp.ceil(fraction * n_elig).astype(jnp.int32), 1, n_elig // 2)",
      "jnp.clip(jnp.floor(fraction * n_elig).astype(jnp.int32), 1, n_elig // 2)",
      "wrong rounding: floor instead of Ray Tune's ceil of fraction * n", *PBT_TRUNC,
      added=_c("test_truncation_select_replaces_ceil_fraction_members")),
    M("ttest_biased_variance", "meta/pbt/exploit.py",
      "0.0), -1) / jnp.maximum(n - 1, 1.0)", "0.0), -1) / jnp.maximum(n, 1.0)",
      "off by one: the biased (1/n) variance in the t-test", *PBT_TTEST,
      added=_c("test_ttest_uses_unbiased_variances")),
    M("random_other_may_be_self", "meta/pbt/exploit.py",
      "jax.random.randint(key, (p,), 1, max(p, 2))", "jax.random.randint(key, (p,), 0, p)",
      "off by one: the 'other' member may be the member itself", *PBT_PAIR,
      added=_c("test_random_other_is_never_self_and_covers_the_rest")),
    M("perturb_log1m_ignored", "meta/pbt/explore.py",
      "new = jnp.where(codes == 2, 1.0 - (1.0 - h) * f, h * f)", "new = h * f",
      "a setting ignored: log1m scales (gamma) perturbed like the others", *PBT_EXPLORE),
    # --- meta/stats.py -----------------------------------------------------------------------------
    M("stderr_biased_std", "meta/stats.py",
      "np.std(x, ddof=1) / np.sqrt(x.size)", "np.std(x) / np.sqrt(x.size)",
      "off by one: ddof=0 standard deviation", STATS),
    M("bootstrap_one_sided_alpha", "meta/stats.py",
      "alpha = (1.0 - confidence) / 2", "alpha = 1.0 - confidence",
      "dropped /2: a 90% interval reported as 95%", STATS),
    M("bootstrap_seed_ignored", "meta/stats.py",
      "rng = np.random.default_rng(seed)", "rng = np.random.default_rng(0)",
      "a setting ignored: bootstrap_ci(seed=...) always resamples with seed 0", STATS,
      added=_c("test_bootstrap_seed_changes_the_resamples")),
    # --- meta/checkpoint.py and the resume paths ----------------------------------------------------
    M("restore_keeps_target_keys", "meta/checkpoint.py",
      "jax.random.wrap_key_data(x, impl=_key_impl(t)) if _is_key(t) else x",
      "t if _is_key(t) else x",
      "resume keeps the fresh run's RNG keys instead of the saved ones",
      T + "test_pipeline_es.py::test_resume_is_bit_for_bit", T + "test_pbt.py::test_checkpoint_roundtrip_of_keys",
      added=(RESUME + "::test_pbt_resume_in_a_fresh_process_equals_the_uninterrupted_run",
             RESUME + "::test_es_over_pipeline_units_resume_in_a_fresh_process_equals_the_uninterrupted_run")),
    M("restore_ignores_config", "meta/checkpoint.py",
      "    if stored != config:\n", "    if False:\n",
      "dropped check: a checkpoint of another config resumes silently", T + "test_es.py::test_resume_is_bit_for_bit"),
    M("es_resume_keeps_fresh_state", "meta/meta_train/loop.py",
      "start, state, stored = checkpoint.restore(ckpt_dir, state, document)",
      "start, _restored, stored = checkpoint.restore(ckpt_dir, state, document)",
      "resume reads the checkpoint's step and logs but continues from the fresh state (keys, generation, ES mean)",
      T + "test_es.py::test_resume_is_bit_for_bit",
      added=(RESUME + "::test_es_resume_in_a_fresh_process_equals_the_uninterrupted_run",
             RESUME + "::test_es_over_pipeline_units_resume_in_a_fresh_process_equals_the_uninterrupted_run")),
    M("pbt_resume_keeps_fresh_state", "meta/pbt/run.py",
      "start, state, document = checkpoint.restore(ckpt_dir, state, doc_config)",
      "start, _restored, document = checkpoint.restore(ckpt_dir, state, doc_config)",
      "resume reads the checkpoint's round and history but continues from the fresh population",
      T + "test_pbt.py::test_checkpoint_roundtrip_of_keys", T + "test_pbt.py::test_script_tiny_cartpole",
      added=RESUME + "::test_pbt_resume_in_a_fresh_process_equals_the_uninterrupted_run"),
]
