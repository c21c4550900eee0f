"""pixelmed's validators (Debian pixelmed-apps) and dciodvfy as test helpers, with the validators' known limits."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# pixelmed compiles its templates to XSLT with more XPath operators than the JDK's secure-processing defaults
# allow (JAXP0801003); the limits are lifted for the validator's own, trusted stylesheets.
JAVA_XML_LIMITS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")

# Errors that are limits of the validator, not of the object, each with the reason.
PIXELMED_LIMITS: dict[str, str] = {
    "GeneralSeriesModule/Laterality/: : Missing conditional attribute": (
        "pixelmed requires Laterality whenever Image and Frame Laterality are absent, leaving out the standard's "
        "'paired body part' condition (PS3.3 C.7.3.1); a chest CT's SEG must not carry it, and dciodvfy reports "
        "an empty one as 'present when condition unsatisfied'"
    ),
}


def have_pixelmed() -> bool:
    """Whether java and pixelmed's jar are installed."""
    return PIXELMED_JAR.exists() and shutil.which("java") is not None


HARNESS = Path(__file__).with_name("PixelmedValidate.java")


def pixelmed_reports(paths: list[Path]) -> dict[Path, list[str]]:
    """Each file's report from pixelmed (DicomSRValidator for SR and KOS: IOD and templates;
    DicomInstanceValidator for the others), all in one JVM (tests/PixelmedValidate.java)."""
    cmd = ["java", *JAVA_XML_LIMITS, "-cp", str(PIXELMED_JAR), str(HARNESS), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or "Exception" in proc.stderr:
        raise RuntimeError(f"pixelmed did not run: {(proc.stdout + proc.stderr)[-3000:]}")
    reports: dict[Path, list[str]] = {}
    current: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("=== "):
            current = reports.setdefault(Path(line[4:]), [])
        else:
            current.append(line)
    return reports


def pixelmed_errors(paths: list[Path]) -> dict[Path, list[str]]:
    """Error lines per file, less the documented validator limits (``PIXELMED_LIMITS``)."""
    return {
        path: [line for line in lines if "Error" in line and not any(limit in line for limit in PIXELMED_LIMITS)]
        for path, lines in pixelmed_reports(paths).items()
    }


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dicom3tools' dciodvfy."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
