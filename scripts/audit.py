"""Audit the installed environment for known vulnerabilities with pip-audit, and never pass by not looking.

pip-audit asks a vulnerability service about every installed distribution: PyPI's JSON API (``pypi``) or
OSV (``osv``). Behind a proxy that serves only the package index, both can be unreachable; pip-audit then
skips every package and still reports "No known vulnerabilities found". This wrapper tries each service and
exits

* 0 when a service answered for every one of the project's runtime dependencies and found nothing;
* 1 when it found vulnerabilities (listed);
* 2 when no service could audit the dependencies (the audit did not run -- not a pass).

Run by ``make audit`` (which installs pip-audit into the venv first).
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Distributions the tool depends on at run time; each must be audited for the result to count.
REQUIRED = ("onnx", "protobuf", "onnxruntime", "onnx-graphsurgeon", "numpy", "typer", "rich")


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def run_service(service: str) -> tuple[dict | None, str]:
    cmd = [sys.executable, "-m", "pip_audit", "--vulnerability-service", service, "--format", "json", "--progress-spinner", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        return json.loads(proc.stdout), proc.stderr.strip()
    except json.JSONDecodeError:
        return None, (proc.stderr or proc.stdout).strip()


def main() -> int:
    failures = []
    for service in ("pypi", "osv"):
        report, errors = run_service(service)
        if report is None:
            failures.append(f"{service}: pip-audit failed: {errors.splitlines()[-1] if errors else 'no output'}")
            continue
        deps = {_normalise(d["name"]): d for d in report.get("dependencies", [])}
        missing = [name for name in REQUIRED if name not in deps or "skip_reason" in deps[name]]
        if missing:
            reason = deps[missing[0]].get("skip_reason", "not installed") if missing[0] in deps else "not installed"
            failures.append(f"{service}: could not audit {', '.join(missing)} ({reason})")
            continue
        vulnerable = [(d["name"], d["version"], v) for d in deps.values() for v in d.get("vulns", [])]
        audited = sum("skip_reason" not in d for d in deps.values())
        if vulnerable:
            for name, version, vuln in vulnerable:
                fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix released"
                sys.stdout.write(f"{name} {version}: {vuln['id']} (fixed in: {fixes})\n")
            sys.stdout.write(f"audit ({service}): {len(vulnerable)} known vulnerabilities in {audited} audited packages\n")
            return 1
        sys.stdout.write(f"audit ({service}): no known vulnerabilities in {audited} audited packages "
                         f"({len(deps) - audited} skipped, none of them a runtime dependency)\n")
        return 0
    sys.stderr.write("audit did not run: no vulnerability service could be reached for the runtime dependencies\n")
    for line in failures:
        sys.stderr.write(f"  {line}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
