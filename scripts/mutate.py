"""Mutation pass over the method and the loop: apply one deliberate bug at a time, run the method
tests, and count the bugs the suite catches (the mutation score in docs/METHOD.md).

    python scripts/mutate.py [--only ID ...] [--list] [--timeout 300] [--json runs/mutation.json]

Each mutant replaces one exact snippet (which must occur exactly once) in a *copy* of the source
tree made in a temporary directory, so the working tree is never touched and a crash cannot leave
a bug behind. A mutant is killed when the test command exits non-zero (a failure, an error or a
time-out) and survives when the tests pass. The test command runs with `-x`, so killed mutants
stop at their first failing test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_aib.py", "tests/test_modulation.py", "tests/test_contribution.py", "tests/test_trainer.py",
         "tests/test_method_runs.py", "tests/test_loss_pinning.py", "tests/test_optim_groups.py",
         "tests/test_resume_guard.py"]


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...] = ()  # the test files that must catch it (default: TESTS, the method tests)


M = Mutant
PROTOCOL_TESTS = ("tests/test_final_stage.py",)
MUTANTS = [
    # ---- eq 21 assembly and the AIB (the bugs that passed the suite before the loss-pinning tests)
    M("beta_other_modality", "calray/method/aib.py", "def _beta(a):\n    return compression_factors(a)\n",
      "def _beta(a):\n    b = compression_factors(a)\n    return dict(zip(b, reversed(list(b.values()))))\n",
      "β of one modality given to the other in the loss"),
    M("aib_mode_ignored", "calray/method/asymmetric_ib.py", "aib_weights(a, self.cfg.method.aib)", "aib_weights(a, \"beta\")",
      "the configured Table IV mode ignored (every mode trains as beta)"),
    M("izy_from_fused_ce", "calray/method/asymmetric_ib.py", "l_aib = aib_loss(kl, step.ce, self.h_y,",
      "l_aib = aib_loss(kl, {k: step.log[\"loss_fused\"] for k in step.ce}, self.h_y,", "I(Z;Y) computed from the fused CE"),
    M("aib_kl_dropped_eq19", "calray/method/aib.py", "weighted = torch.stack([w * kl[m] for m, w in weights.items()])",
      "weighted = torch.stack([0.0 * kl[m] for m, w in weights.items()])",
      "the KL term of eq 19's AIB dropped"),
    M("aib_kl_dropped_eq20", "calray/method/aib.py", "F.softplus(torch.stack([kl[m] for m in weights]) - relevance)",
      "F.softplus(-relevance)",
      "the KL term of eq 20's AIB dropped"),
    M("h_y_zero", "calray/method/asymmetric_ib.py", "self.h_y = label_entropy(context.train_class_counts)", "self.h_y = 0.0",
      "H(Y) = 0"),
    M("unimodal_ce_dropped", "calray/engine/trainer.py",
      "terms = {\"fused\": loss_fused, \"unimodal\": ce_sum if w == 1.0 else w * ce_sum}",
      "terms = {\"fused\": loss_fused}", "the Σ CE(p^m) term of eq 21 dropped"),
    M("mi_pair_unimodal", "calray/method/contribution.py", "reps, fused_rep = list(logits[1:1 + m]), logits[0]",
      "reps, fused_rep = list(logits[1:1 + m]), logits[1]",
      "the fused logits of the MI pair replaced by a unimodal one"),
    M("lambda_ignored", "calray/method/asymmetric_ib.py", "\"aib\": m.lambda_ * l_aib", "\"aib\": l_aib",
      "λ of eq 21 ignored"),
    M("placement_ignored", "calray/method/asymmetric_ib.py", "self.weights, m.aib_placement)",
      "self.weights, \"eq20\")", "the eq 19 / eq 20 switch ignored"),
    M("beta_T_ignored", "calray/method/asymmetric_ib.py", "m.T if m.beta_T is None else m.beta_T", "m.T",
      "β's own temperature ignored"),
    M("beta_is_a", "calray/method/aib.py", "return {m: (total - v) / total for m, v in a.items()}",
      "return {m: v / total for m, v in a.items()}", "eq 17: β_m = a_m instead of 1 − a_m"),
    M("inv_beta_not_inverted", "calray/method/aib.py", "1.0 / max(b, MIN_BETA)", "max(b, MIN_BETA)",
      "inv_beta mode uses β"),
    M("mi_mx_swapped", "calray/method/aib.py", "return {_lowest(a): 1.0}", "return {_highest(a): 1.0}",
      "mi mode picks the highest-contribution modality"),
    M("kl_missing_minus_one", "calray/method/aib.py", "mean() * (0.5 * d) - 0.5 * d", "mean() * (0.5 * d)",
      "Gaussian KL without the −1"),
    M("entropy_sign", "calray/method/aib.py", "return float(-(p * p.log()).sum())", "return float((p * p.log()).sum())",
      "H(Y) with the wrong sign"),
    M("grad_accum_unscaled", "calray/engine/trainer.py", "scaled = terms if accum == 1 else {k: v / accum for k, v in terms.items()}",
      "scaled = terms",
      "accumulated gradients not divided by grad_accum"),
    # ---- model selection and the final test
    M("select_on_test", "calray/engine/trainer.py", "val = self.evaluate(self.val_loader)", "val = self.evaluate(self.test_loader)",
      "model selection on test instead of validation"),
    M("test_last_weights", "calray/engine/trainer.py", "        if best_path.is_file():\n            self.raw_model.load_state_dict(",
      "        if False:\n            self.raw_model.load_state_dict(", "final test on the last weights, not the best-on-val"),
    M("best_every_epoch", "calray/engine/trainer.py", "            if improved:\n                save_checkpoint(",
      "            if True:\n                save_checkpoint(", "best.pt overwritten every epoch"),
    # ---- modulation (eq 12–14) and OGM-GE
    M("eta_ignored", "calray/method/modulation.py", "s = 1.0 + eta * am", "s = 1.0 + am", "η of eq 14 ignored"),
    M("scale_sign", "calray/method/modulation.py", "s = 1.0 + eta * am", "s = 1.0 - eta * am", "eq 14 subtracts"),
    M("T_ignored", "calray/method/modulation.py", "a = torch.softmax(T * torch.tensor(", "a = torch.softmax(torch.tensor(",
      "eq 12 without T"),
    M("weak_is_strong", "calray/method/strategies.py", "contribution_softmax(W, -self.cfg.method.T)",
      "contribution_softmax(W, self.cfg.method.T)",
      "weak strategy = cal"),
    M("null_zero", "calray/method/strategies.py", "return {m: 1.0 / len(W) for m in W}", "return {m: 0.0 for m in W}",
      "null strategy applies no modulation"),
    M("modulation_skipped", "calray/engine/trainer.py", "                method.after_backward(self.raw_model, s)\n",
      "                pass\n", "the loop never modulates"),
    M("warmup_off_by_one", "calray/method/strategies.py", "active = step.epoch >= self.cfg.method.warmup_epochs",
      "active = step.epoch > self.cfg.method.warmup_epochs", "modulation starts one epoch late"),
    M("ogm_scores_swapped", "calray/method/ogm_ge.py", "for mod, s in zip(unimodal, scores)}",
      "for mod, s in zip(unimodal, scores.flip(0))}", "OGM-GE's scores assigned to the wrong modality"),
    M("ogm_alpha_ignored", "calray/method/modulation.py", "out[m] = 1.0 - math.tanh(alpha * rho) if rho > 1.0 else 1.0",
      "out[m] = 1.0 - math.tanh(rho) if rho > 1.0 else 1.0", "OGM-GE's α ignored"),
    M("ogm_window_open_end", "calray/method/ogm_ge.py", "not (start <= step.epoch <= end)", "not (start <= step.epoch < end)",
      "OGM-GE's window excludes its last epoch"),
    # ---- contributions (eq 5–10)
    M("phi_sign", "calray/method/contribution.py", "self.loglik_gain += (lp_f[None] - lp_a).sum(1)",
      "self.loglik_gain += (lp_a - lp_f[None]).sum(1)", "eq 8 with the difference reversed"),
    M("p_is_logprob", "calray/method/contribution.py", "self.true_prob += lp_u.exp().sum(1)",
      "self.true_prob += lp_u.sum(1)", "eq 7 sums log-probabilities"),
    M("mi_no_half", "calray/method/contribution.py", "return max(0.5 * float(logdet_x + logdet_y - logdet_z), 0.0)",
      "return max(float(logdet_x + logdet_y - logdet_z), 0.0)", "eq 5 without the ½"),
    M("r_no_clip", "calray/method/contribution.py", "past = history[max(t - n, 0)]", "past = history[t - n]",
      "eq 9's t − n not clipped at the first epoch"),
    M("w_is_d_plus_i", "calray/method/contribution.py", "register(\"d_x_i\")(lambda d, info, kl: d * info)",
      "register(\"d_x_i\")(lambda d, info, kl: d + info)",
      "eq 1: W = D + I instead of D × I"),
    M("refresh_window_only", "calray/engine/contributions.py", "self.epoch_stats if end_of_epoch else self.window",
      "self.window", "the epoch-end refresh reads only the last window"),
    # ---- the comparison protocol's sweep side (calray/sweep/final.py, calray/ray/batch.py)
    M("final_data_seed_fixed", "calray/sweep/final.py", '    tree["data"]["seed"] = seed\n', "",
      "final retrains keep the best config's data seed (runs not paired on data)", PROTOCOL_TESTS),
    M("final_seeds_unpaired", "calray/sweep/final.py", "cfg = final_config(best, cell, seed, sweep_dir)",
      "cfg = final_config(best, cell, seed + len(runs) // len(plan.spec.final.seed_list), sweep_dir)",
      "each cell retrained with its own seeds (not paired across cells)", PROTOCOL_TESTS),
    M("final_test_is_val", "calray/sweep/final.py", 'test_acc=summary["test"]["acc"]', 'test_acc=summary["best_val_acc"]',
      "final.csv's test accuracy taken from the validation split", PROTOCOL_TESTS),
    M("final_reuse_any_config", "calray/ray/batch.py", "if read_yaml(cfg_path) != config_from_dict(run.config).to_dict():",
      "if False:", "a finished run reused although its config differs", PROTOCOL_TESTS),
]


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout (what CI would see)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(workdir: Path, timeout: float, files: tuple[str, ...] = ()) -> tuple[bool, float, str]:
    """(passed, seconds, last line) of the tests (default: the method tests) against the copy in `workdir`."""
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    tests = [t for t in (files or TESTS) if (workdir / t).is_file()]
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.time() - t0, "timeout"
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return res.returncode == 0, time.time() - t0, lines[-1] if lines else res.stderr.strip()[-200:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.id:24s} {m.path:26s} {m.what}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="calray_mutate_") as tmp:
        work = Path(tmp)
        copy_tree(work)
        check = subprocess.run([sys.executable, "-c", "import calray; print(calray.__file__)"], cwd=work,
                               env={**os.environ, "PYTHONPATH": str(work)}, capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(work)):
            print(f"error: the copy's calray is not the one imported ({check.stdout.strip()})", file=sys.stderr)
            return 2
        groups = sorted({m.tests for m in mutants})
        ok, secs, line = True, 0.0, ""
        for files in groups:
            passed, took, line = run_tests(work, args.timeout, files)
            ok, secs = ok and passed, secs + took
        print(f"unmutated: {'pass' if ok else 'FAIL'} in {secs:.0f}s ({line})", flush=True)
        if not ok:
            print("error: the unmutated tests fail; fix them before scoring mutants", file=sys.stderr)
            return 2
        for m in mutants:
            path = work / m.path
            text = path.read_text()
            if text.count(m.old) != 1:
                results.append({"id": m.id, "what": m.what, "status": "stale", "detail": f"snippet found {text.count(m.old)}×"})
                print(f"{m.id:24s} STALE (snippet found {text.count(m.old)}× in {m.path})", flush=True)
                continue
            path.write_text(text.replace(m.old, m.new))
            try:
                passed, secs, line = run_tests(work, args.timeout, m.tests)
            finally:
                path.write_text(text)
            status = "survived" if passed else "killed"
            results.append({"id": m.id, "path": m.path, "what": m.what, "status": status, "seconds": round(secs, 1),
                            "detail": line})
            print(f"{m.id:24s} {status.upper():9s} {secs:5.0f}s  {m.what}", flush=True)
    scored = [r for r in results if r["status"] != "stale"]
    killed = sum(r["status"] == "killed" for r in scored)
    print(f"mutation score: {killed}/{len(scored)} killed"
          + (f"; survivors: {', '.join(r['id'] for r in scored if r['status'] == 'survived')}" if killed < len(scored) else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"tests": TESTS, "results": results}, indent=2) + "\n")
    return 0 if killed == len(scored) and len(scored) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
