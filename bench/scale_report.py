"""The paper-scale trial's table (`python -m bench.scale`), from its results.json."""
from __future__ import annotations

GB = 1e9


def report(r: dict) -> str:
    ck, ld, ip, ex, sv, st = (r[k] for k in ("checkpoint", "load", "inproc", "export", "serve",
                                             "ort_step"))
    nets = ld["network_fp32_bytes"]
    loaded, busy = sum(sv["rss_after_load"].values()), sum(sv["rss_under_load"].values())
    peak, peak_by, runs = fp32_peak(st)
    gf = ip["unet_flops"] / 1e9
    lines = [
        f"Model: {ck['parameters'] / 1e9:.3f} B parameters, checkpoint {ck['file_bytes'] / GB:.2f}"
        f" GB ({ck['tensor_bytes'] / GB:.2f} GB of tensors, Lightning 1.4 layout); networks "
        f"served (text encoder, UNet, VAE decoder) {nets / GB:.2f} GB fp32. "
        f"{r['size']}x{r['size']}, DDIM {r['steps']} steps, guidance 5, {r['threads']} threads."
        f" Served networks: {sv.get('networks', 'onnxruntime')}.",
        "",
        "| stage | wall s | peak RSS GB | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| load (`load_compvis`) | {ld['load_s']:.1f} | {ld['peak_rss'] / GB:.2f} | "
        f"{ld['peak_rss'] / ld['ckpt_tensor_bytes']:.2f}x tensor bytes | <= 1.25x |",
        f"| one image in process (PyTorch) | {ip['image_s']:.1f} | {ip['peak_rss'] / GB:.2f} | "
        f"{ip['peak_rss'] / ld['ckpt_tensor_bytes']:.2f}x tensor bytes | |",
        f"| export (`export.build_engines`) | {ex['export_s']:.1f} | {ex['peak_rss'] / GB:.2f} | "
        f"{ex['peak_rss'] / ld['model_fp32_bytes']:.2f}x fp32 weights | <= 1.5x |",
        f"| serve: start to ready | {sv['ready_s']:.1f} | {loaded / GB:.2f} (all processes) | "
        f"{loaded / nets:.2f}x network weights | <= 1.3x |",
        f"| serve: 4 concurrent requests ({r['load_steps']} steps) | {sv['load_4_s']:.1f} | "
        f"{busy / GB:.2f} (all processes) | {busy / nets:.2f}x network weights | <= 1.3x |",
        f"| one image over HTTP | {sv['http_s']:.1f} | | {sv['http_psnr']:.1f} dB vs in process"
        " | >= 40 dB |",
        f"| one image over gRPC streaming | {sv['grpc_stream_s']:.1f} | | "
        f"{sv['grpc_stream_psnr']:.1f} dB vs in process | >= 40 dB |",
        "",
        "| process | RSS after load GB | RSS at peak under 4 requests GB |",
        "|---|---:|---:|",
    ]
    names = {k.rsplit(" (", 1)[0]: k for k in sv["rss_after_load"]}
    busy_names = {k.rsplit(" (", 1)[0]: v for k, v in sv["rss_under_load"].items()}
    for short, key in sorted(names.items()):
        lines.append(f"| {short} | {sv['rss_after_load'][key] / GB:.2f} | "
                     f"{busy_names.get(short, 0) / GB:.2f} |")
    lines += [
        "",
        f"UNet step at batch 2 ({gf:.0f} GFLOP counted): PyTorch eager {ip['unet_step_s']:.2f} s "
        f"({gf / ip['unet_step_s'] / peak:.0%} of peak), ONNX Runtime {st['ort_unet_step_s']:.2f}"
        f" s ({gf / st['ort_unet_step_s'] / peak:.0%} of peak). fp32 GEMM peak {peak:.0f} GFLOP/s"
        f" set by {peak_by} ({runs}), 2048^3, same process.",
    ]
    return "\n".join(lines)


def fp32_peak(st: dict) -> tuple[float, str, str]:
    """(GFLOP/s, the runtime that set it, every runtime's figure) of the fp32 GEMM peak; older
    results.json files measured only ONNX Runtime and PyTorch."""
    if "peaks" in st:
        runs = {k.split("/")[0]: v for k, v in st["peaks"]["runs"].items()
                if k.endswith("/fp32") and v}
    else:
        runs = {"onnxruntime": st["ort_gemm_gflops"], "torch": st["torch_gemm_gflops"]}
    best = max(runs, key=runs.get)
    return runs[best], best, ", ".join(f"{k} {v:.0f}" for k, v in runs.items())
