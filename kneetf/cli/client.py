"""`kneetf client --server HOST:8500 xray.dcm [...] --out pred.nii.gz|DIR`: ask TF Serving."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kneetf.protocol import DEFAULT_MODEL_NAME, SIGNATURE_DEFAULT, SIGNATURE_DTYPES

    p.add_argument("xrays", nargs="*", metavar="XRAY",
                   help="ROI-cropped knee X-ray files (DICOM, PNG/TIFF/JPEG, .npy)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="gRPC address of TF Serving (e.g. localhost:8500)")
    where.add_argument("--rest", metavar="URL", help="REST address of TF Serving (e.g. http://localhost:8501)")
    p.add_argument("--out", help="output .nii/.nii.gz file (one X-ray) or folder (<stem>.nii.gz per X-ray)")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name on the server (default: %(default)s)")
    p.add_argument("--version", type=int, help="model version (default: the server's latest)")
    p.add_argument("--signature", default=SIGNATURE_DEFAULT, choices=list(SIGNATURE_DTYPES),
                   help="signature to call (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="deadline per request in seconds (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries while the server is unavailable (default: %(default)s)")
    p.add_argument("--no-client-resize", action="store_true",
                   help="send images at their own size (the server resizes; breaks server-side batching of "
                        "mixed sizes)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--tls-ca", metavar="PEM", help="use TLS with this CA certificate")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate chain for mutual TLS (gRPC)")
    p.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS (gRPC)")
    p.add_argument("--tls-server-name", help="name expected in the server certificate (gRPC)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SLICE", "ROW", "COL"),
                   help="voxel spacing in mm written to the NIfTI header (default: 1 1 1)")
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


def _outputs(xrays: list[Path], out: str) -> list[Path]:
    """One output file per X-ray: `out` itself for one X-ray named .nii/.nii.gz, else out/<stem>.nii.gz."""
    from kneetf.errors import ConfigError
    from kneetf.inference.batch import file_id

    target = Path(out)
    is_file = target.name.endswith(".nii") or target.name.endswith(".nii.gz")
    if is_file:
        if len(xrays) != 1:
            raise ConfigError(f"--out {out} is a file but {len(xrays)} X-rays were given; use a folder")
        return [target]
    paths = [target / f"{file_id(x)}.nii.gz" for x in xrays]
    seen: dict[Path, Path] = {}
    for x, p in zip(xrays, paths):
        if p in seen:
            raise ConfigError(f"{seen[p]} and {x} would both be written to {p}; rename one")
        seen[p] = x
    return paths


def run(args: argparse.Namespace) -> int:
    from kneetf.errors import ConfigError, InputError

    common = dict(model=args.model, version=args.version, signature=args.signature, timeout=args.timeout,
                  retries=args.retries, tls=_tls(args), resize=not args.no_client_resize)
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
        if not args.xrays:
            raise ConfigError("no X-ray given (or use --status)")
        if not args.out:
            raise ConfigError("--out is required: a .nii.gz file or a folder")
        from kneetf.io.writers import write_nifti

        xrays = [Path(x) for x in args.xrays]
        failed = 0
        for xray, target in zip(xrays, _outputs(xrays, args.out)):
            try:
                volume = client.predict(xray)["mri"][0]  # (H, W, slices)
            except InputError as e:
                print(f"kneetf client: {e}", file=sys.stderr)
                failed += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            write_nifti(target, volume.transpose(2, 0, 1), tuple(args.spacing), slices_first=True)
            print(f"{xray} -> {target} ({volume.shape[2]} slices of {volume.shape[0]}x{volume.shape[1]})")
    if failed:
        print(f"kneetf client: {failed} of {len(xrays)} X-ray(s) failed", file=sys.stderr)
    from kneetf.cli.exits import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL

    return EXIT_OK if not failed else EXIT_PARTIAL if failed < len(xrays) else EXIT_ERROR
