"""`kneetf client --server HOST:8500 xray.dcm [...] --out pred.nii.gz|DIR`: ask TF Serving.

The X-rays are prepared as `kneetf predict` prepares them (ROI, left-knee mirroring; see
`kneetf.client.xray`) and the volumes written by predict's writer, so the two agree. An
X-ray that fails is reported at the end and the others are written; exit status 4 then
(1 when none could be written; `kneetf.cli.exits`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kneetf.cli.options import add_naming_flags
    from kneetf.protocol import DEFAULT_MODEL_NAME, SIGNATURE_DEFAULT, SIGNATURE_DTYPES

    p.add_argument("xrays", nargs="*", metavar="XRAY",
                   help="knee X-ray files (DICOM, PNG/TIFF/JPEG, .npy), folders of them or a manifest .csv; the "
                        "knee ROI is found and left knees mirrored as `kneetf predict` does")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="gRPC address of TF Serving (e.g. localhost:8500)")
    where.add_argument("--rest", metavar="URL", help="REST address of TF Serving (e.g. http://localhost:8501)")
    p.add_argument("--out", help="output .nii/.nii.gz file (one X-ray) or folder (<id>.nii.gz per X-ray)")
    add_naming_flags(p, "output names in a folder --out, as kneetf predict names them (no --keep-patient here)")
    p.add_argument("--model-info", "--roi-from", metavar="JSON_OR_DIR",
                   help="the export's kneetf_export.json (or its version folder): the model's preprocessing "
                        "(left-knee mirroring, sizes) and ROI source (default: the documented defaults and the "
                        "built-in ROI detector)")
    roi = p.add_mutually_exclusive_group()
    roi.add_argument("--rois", metavar="BOXES_CSV", help="ROI boxes CSV id,x0,y0,x1,y1 (ids as the outputs')")
    roi.add_argument("--roi-detector", metavar="DETECTOR",
                     help="'builtin' (the detector shipped with kneetf), a trained ROI detector (.keras from "
                          "kneetf train-roi) or 'classical' (the image-analysis fallback); default: the ROI source "
                          "of --model-info, else the built-in detector")
    roi.add_argument("--cropped", action="store_true",
                     help="the X-rays are knee ROI crops already (square): no ROI search")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name on the server (default: %(default)s)")
    p.add_argument("--version", type=int, help="model version (default: the server's latest)")
    p.add_argument("--signature", default=SIGNATURE_DEFAULT, choices=list(SIGNATURE_DTYPES),
                   help="signature to call (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="deadline per request in seconds (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries while the server is unavailable (default: %(default)s)")
    p.add_argument("--no-client-resize", action="store_true",
                   help="send the ROI crop at its own size (the server resizes; breaks server-side batching of "
                        "mixed sizes)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--tls-ca", metavar="PEM", help="use TLS with this CA certificate")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate chain for mutual TLS (gRPC)")
    p.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS (gRPC)")
    p.add_argument("--tls-server-name", help="name expected in the server certificate (gRPC)")
    p.add_argument("--status", action="store_true", help="print the model's status on the server and exit")


def _tls(args: argparse.Namespace) -> Any:
    if args.tls_cert or args.tls_key:
        if args.rest:
            from kneetf.errors import ConfigError

            raise ConfigError("--tls-cert/--tls-key (mutual TLS) are supported with --server (gRPC) only")
        return {"root_certificates": args.tls_ca, "private_key": args.tls_key, "certificate_chain": args.tls_cert}
    if args.tls_ca:
        return args.tls_ca
    return bool(args.tls)


def _is_file_target(out: str) -> bool:
    return out.endswith(".nii") or out.endswith(".nii.gz")


def _targets(items: list[Any], out: str) -> list[Path]:
    """One output file per X-ray: `out` itself for one X-ray named .nii/.nii.gz, else
    out/<name>.nii.gz (the names `kneetf predict` writes: `item.name`, else the id)."""
    from kneetf.errors import ConfigError
    from kneetf.inference.batch import output_name

    target = Path(out)
    if _is_file_target(target.name):
        if len(items) != 1:
            raise ConfigError(f"--out {out} is a file but {len(items)} X-rays were given; use a folder")
        return [target]
    return [target / f"{item.name or output_name(item.id)}.nii.gz" for item in items]


def run(args: argparse.Namespace) -> int:
    from kneetf.errors import ConfigError, ModelNotFoundError, ServerUnavailableError, storage_reason

    if args.status:
        info = None
    else:
        if not args.xrays:
            raise ConfigError("no X-ray given (or use --status)")
        if not args.out:
            raise ConfigError("--out is required: a .nii.gz file or a folder")
        from kneetf.client.xray import read_model_info

        info = read_model_info(args.model_info)
    sizes = {} if info is None else {"image_size": info.preprocess.image_size,
                                     "num_slices": info.preprocess.num_slices}
    common = dict(model=args.model, version=args.version, signature=args.signature, timeout=args.timeout,
                  retries=args.retries, tls=_tls(args), resize=not args.no_client_resize, **sizes)
    if args.server:
        from kneetf.client.grpc import ServingClient

        client: Any = ServingClient(args.server, tls_server_name=args.tls_server_name, **common)
    else:
        from kneetf.client.rest import RestClient

        client = RestClient(args.rest, **common)
    with client:
        if args.status:
            for s in client.status():
                err = f" ({s['error_message']})" if s["error_message"] else ""
                print(f"{args.model} version {s['version']}: {s['state']}{err}")
            return 0
        from kneetf.client.xray import WholeImage, reconstruct
        from kneetf.inference.batch import collect_named_inputs, error_reason, resolve_names
        from kneetf.inference.outputs import PSEUDONYM_KEY, write_volume
        from kneetf.inference.loading import model_roi_source
        from kneetf.io.outdir import OutputFolder
        from kneetf.preprocess.roi_detector_config import is_named_source

        if args.cropped:
            roi: Any = WholeImage()
        else:  # the ROI source the model was trained with, unless --rois / --roi-detector say otherwise
            roi = model_roi_source(args.model_info, boxes=args.rois, detector=args.roi_detector)
        folder = None if _is_file_target(args.out) else OutputFolder(args.out)
        try:
            names = resolve_names(args.names, keep_patient=False)
            items, failures = collect_named_inputs(args.xrays, names, roi)
            refused = list(failures)
            if folder is not None:  # as `kneetf predict`: never among the inputs, never over a file it did not write
                folder.refuse_inputs([*args.xrays, *(it.path for it in items),
                                      *(p for p in (args.rois, args.roi_detector) if p and not is_named_source(p))])
            total = len(items) + len(failures)
            key = None
            if names == "pseudonym" and items and folder is not None:
                from kneetf.inference.pseudonyms import PseudonymKey

                if not args.pseudonym_key:
                    folder.claim([folder.path / PSEUDONYM_KEY])
                key = PseudonymKey(args.pseudonym_key or folder.path / PSEUDONYM_KEY)
                key.assign(items)  # the key first: outputs of an interrupted run stay traceable
                key.write((it.name, str(it.path), "") for it in items)
            targets = _targets(items, args.out) if items else []
            written: set[str] = set()
            for i, (item, target) in enumerate(zip(items, targets)):
                try:
                    _, volume = reconstruct(client, item, info.preprocess, roi)
                    if folder is not None:
                        folder.claim([target])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_volume(target, volume)
                except (ServerUnavailableError, ModelNotFoundError) as e:  # every other X-ray would fail alike
                    failures += [{"id": it.id, "file": str(it.path),
                                  "reason": error_reason(e) if it is item else "not sent"} for it in items[i:]]
                    break
                except Exception as e:  # this X-ray or this answer: report it, go on with the others
                    if storage_reason(e) is not None:  # a full or read-only --out: every other X-ray would fail alike
                        raise
                    reason = error_reason(e)
                    if folder is not None and folder.discard([target]):  # as `kneetf predict`: not this run's
                        reason += f" (its earlier output {target.name} removed)"
                    failures.append({"id": item.id, "file": str(item.path), "reason": reason})
                    continue
                written.add(item.name)
                print(f"{item.path} -> {target} ({volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]})")
            if key is not None:  # each pseudonym's result, refused inputs included (as predict's)
                key.write([(it.name, str(it.path), "written" if it.name in written else "failed") for it in items]
                          + [(key.name_for(f["file"]), f["file"], "failed") for f in refused])
        finally:
            if folder is not None:
                folder.release()
    if failures:
        print(f"kneetf client: {len(failures)} of {total} X-ray(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f['file']}: {f['reason']}", file=sys.stderr)
    from kneetf.cli.exits import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL

    return EXIT_OK if not failures else EXIT_PARTIAL if len(failures) < total else EXIT_ERROR
