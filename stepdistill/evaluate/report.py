"""report.json, report.md, FID / CLIP-vs-NFE plots and sample grids."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image

from .generate import image_path


def _fmt(v, nd=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}f}"
    return str(v)


def sample_grid(folder: Path, n: int, cols: int | None = None) -> Image.Image | None:
    files = [image_path(folder, i) for i in range(n)]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    ims = []
    for f in files:
        with Image.open(f) as im:
            ims.append(im.convert("RGB"))
    cols = cols or int(math.ceil(math.sqrt(len(ims))))
    rows = int(math.ceil(len(ims) / cols))
    w, h = ims[0].size
    scale = max(1, 128 // max(w, h))  # small images are enlarged (nearest) so the grid is viewable
    W, H = w * scale, h * scale
    pad = 2
    grid = Image.new("RGB", (cols * (W + pad) + pad, rows * (H + pad) + pad), (255, 255, 255))
    for k, im in enumerate(ims):
        if scale > 1:
            im = im.resize((W, H), Image.NEAREST)
        grid.paste(im, (pad + (k % cols) * (W + pad), pad + (k // cols) * (H + pad)))
    return grid


def _plot(rows: list[dict], key: str, ylabel: str, path: Path, hline=None, hlabel=None) -> bool:
    pts = [r for r in rows if r.get(key) is not None and r.get("nfe")]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    labels = []
    for r in pts:
        if r["label"] not in labels:
            labels.append(r["label"])
    for lab in labels:
        rs = sorted((r for r in pts if r["label"] == lab), key=lambda r: r["nfe"])
        style = "s--" if rs[0].get("role") == "teacher" else "o-"
        ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], style, label=lab)
        for r in rs:
            ax.annotate(f"{r['steps']}", (r["nfe"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle=":", label=hlabel)
    ax.set_xscale("log", base=2)
    nfes = sorted({r["nfe"] for r in pts})
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(v) for v in nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE per image (numbers: steps)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict, out: Path, grid_images: int = 16) -> str:
    """Write everything; returns the markdown table."""
    out = Path(out)
    gen_rows = [r for r in report["rows"] if r.get("role") != "real"]
    real = next((r for r in report["rows"] if r.get("role") == "real"), None)
    # grids
    for r in gen_rows:
        g = sample_grid(Path(r["folder"]), grid_images)
        if g is not None:
            gp = Path(r["folder"]) / "grid.png"
            g.save(gp)
            r["grid"] = os.path.relpath(gp, out)
    # plots
    plots = {}
    floor = (report.get("fid") or {}).get("floor")
    if _plot(gen_rows, "fid", f"FID ({(report.get('fid') or {}).get('backbone', '')})", out / "fid_vs_nfe.png",
             floor["fid"] if floor else None, "real vs real" if floor else None):
        plots["fid"] = "fid_vs_nfe.png"
    if _plot(gen_rows, "clip_score", "CLIP score", out / "clip_vs_nfe.png",
             real.get("clip_score") if real else None, "real images" if real else None):
        plots["clip"] = "clip_vs_nfe.png"
    if _plot(gen_rows, "attribute_accuracy", "attribute accuracy", out / "attr_vs_nfe.png",
             real.get("attribute_accuracy") if real else None, "real images" if real else None):
        plots["attribute_accuracy"] = "attr_vs_nfe.png"
    report["plots"] = plots
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out / "report.json")

    # markdown
    has_attr = any(r.get("attribute_accuracy") is not None for r in report["rows"])
    L = ["# stepdistill evaluation", ""]
    L.append(f"- device: {report['device']} ({report['processes']} process(es))")
    L.append(f"- prompts: {report['prompts']}; {report['num_images']} images per row; {report['seeds']}")
    if report.get("fid"):
        f = report["fid"]
        L.append(f"- FID: backbone {f['backbone']} (input {f['backbone_image_size'] or 'native'} px), reference "
                 f"{f['reference']} ({f['reference_images']} images); {f['protocol']}")
        if f.get("floor"):
            L.append(f"- real-vs-real floor: FID {f['floor']['fid']:.3f} between {f['floor']['between'][0]} and "
                     f"{f['floor']['between'][1]}")
    else:
        L.append("- FID: not computed (no --reference)")
    if report.get("clip"):
        L.append(f"- CLIP score: {report['clip']['model']}; {report['clip']['score']}")
    L.append(f"- speed: {report['speed_protocol']}")
    L.append("")
    head = ["model", "steps", "NFE", "guidance", "FID", "CLIP"] + (["attr. acc."] if has_attr else []) + \
        ["ms/img", "img/s", "batch"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in report["rows"]:
        sp = r.get("speed") or {}
        cells = [r["label"], _fmt(r.get("steps")), _fmt(r.get("nfe")), _fmt(r.get("guidance"), 1),
                 _fmt(r.get("fid"), 3), _fmt(r.get("clip_score"), 2)]
        if has_attr:
            cells.append(_fmt(r.get("attribute_accuracy"), 3))
        cells += [_fmt(sp.get("ms_per_image"), 1), _fmt(sp.get("images_per_s"), 2), _fmt(sp.get("batch_size"))]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    for name, p in plots.items():
        L.append(f"![{name} vs NFE]({p})")
    L.append("")
    for r in gen_rows:
        if r.get("grid"):
            L.append(f"**{r['label']}, {r['steps']} step(s)**  ")
            L.append(f"![{r['label']} {r['steps']} steps]({r['grid']})")
            L.append("")
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(L) + "\n")
    os.replace(tmp, out / "report.md")
    return "\n".join(line for line in L if line.startswith("|"))
