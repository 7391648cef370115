"""Tables of the one-step demonstration's results (markdown): per map, per alpha, per class."""

from __future__ import annotations

from ccnn_jax import reporting

TABLE_COLUMNS = (
    "map",
    "KL(Q_full‖·)",
    "reduction",
    "KL(·‖Q_full)",
    "pixel_accuracy",
    "miou",
    "agree Q_full",
    "agree mIoU",
    "active",
    "converged",
    "max gap",
    "ms/image",
)


def _map_row(name: str, seg: dict, **columns) -> dict:
    return {
        "map": name,
        "pixel_accuracy": seg["pixel_accuracy"],
        "miou": seg["miou"],
        "agree Q_full": seg.get("agreement_accuracy"),
        "agree mIoU": seg.get("agreement_miou"),
        **columns,
    }


def table_rows(results: dict) -> list[dict]:
    """One row per map of a results dict: Q_under, P of each variant, Q_full."""
    rows = [
        _map_row(
            f"Q_under (step {results['under_steps']})",
            results["under"],
            **{"KL(Q_full‖·)": results["kl_full_under"], "reduction": 0.0},
            **{"KL(·‖Q_full)": results["kl_under_full"]},
        )
    ]
    for v, r in results["variants"].items():
        solver = r["solver"]
        columns = {
            "KL(Q_full‖·)": r["kl_full_latent"],
            "reduction": r["reduction"],
            "KL(·‖Q_full)": r["kl_latent_full"],
            "converged": solver["converged_fraction"],
            "active": solver["active_fraction"],
            "max gap": f"{solver['max_gap']:.1e}",
            "ms/image": solver["batched_ms_per_image"],
        }
        rows.append(_map_row(f"P `{v}`", r, **columns))
    if "kl_full_best_shift" in results:
        ceiling = {"KL(Q_full‖·)": results["kl_full_best_shift"]}
        ceiling["reduction"] = results["ceiling_reduction"]
        rows.append({"map": "best label shift of Q_under (ceiling)", **ceiling})
    full = {"KL(Q_full‖·)": 0.0, "KL(·‖Q_full)": 0.0}
    rows.append(_map_row(f"Q_full (step {results['full_steps']})", results["full"], **full))
    return rows


def per_class_rows(results: dict) -> list[dict]:
    """One row per class: its share of the labelled pixels, the IoU of Q_under, of P (default
    variant) and of Q_full, and the KLs and reduction restricted to its pixels."""
    d = results["default_variant"]
    kl = results["variants"][d]["per_class"]
    total = max(sum(kl["pixels"]), 1)
    rows = []
    for k, name in enumerate(results["class_names"]):
        rows.append(
            {
                "class": name,
                "pixels": kl["pixels"][k] / total,
                "IoU Q_under": results["under"]["per_class_iou"][k],
                f"IoU P `{d}`": results["variants"][d]["per_class_iou"][k],
                "IoU Q_full": results["full"]["per_class_iou"][k],
                "KL(Q_full‖Q_under)": kl["kl_full_under"][k],
                "KL(Q_full‖P)": kl["kl_full_latent"][k],
                "reduction": kl["reduction"][k],
            }
        )
    return rows


def markdown(results: dict) -> str:
    """The results table, the alpha sweep, the per-class table and the CVXPY comparison."""
    text = reporting.markdown_table(table_rows(results), TABLE_COLUMNS)
    sweep = results.get("alpha_sweep")
    if sweep:
        text += "\nThe seed's constraint (`all_labels`) for each alpha:\n\n"
        columns = (
            "alpha",
            "kl_full_latent",
            "reduction",
            "pixel_accuracy",
            "miou",
            "active_fraction",
        )
        text += reporting.markdown_table(sweep, columns)
    rows = per_class_rows(results)
    text += f"\nPer class (P = `{results['default_variant']}`):\n\n"
    text += reporting.markdown_table(rows, list(rows[0]))
    c = results.get("cvxpy")
    if c:
        text += (
            f"\nCVXPY/Clarabel on {c['images']} image(s) of {c['image_size'][0]}x"
            f"{c['image_size'][1]} (`{c['variant']}`): {c['cvxpy_seconds_per_image']:.2f} s/image"
            f" vs {c['ours_single_ms_per_image']:.2f} ms/image for our single-image solve "
            f"({c['speedup_single']:.0f}x); max |P_ours - P_cvxpy| = {c['max_abs_diff_p']:.1e}.\n"
        )
    return text
