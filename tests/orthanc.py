"""A real Orthanc PACS with its DICOMweb plugin on loopback, for the tests that talk to a PACS.

Debian's ``orthanc`` (the ``Orthanc`` binary) and ``orthanc-dicomweb`` (the plugin) packages;
``scripts/test.sh`` installs them where it can, and the tests skip with the reason where they are
missing. The configuration is written to a temp dir (storage and index there too), on free ports,
with remote access and authentication off; ``stop`` ends the process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from app.server_process import free_port

#: Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (path for path in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(path).exists()), None
    )


def dicomweb_plugin() -> Path | None:
    return next((path for path in PLUGIN_PATHS if path.exists()), None)


def missing_reason() -> str | None:
    """Why a real Orthanc cannot run here, or None when it can."""
    if orthanc_binary() is None:
        return "needs Debian's orthanc package (the Orthanc binary; scripts/test.sh installs it)"
    if dicomweb_plugin() is None:
        return "needs Debian's orthanc-dicomweb package (the DICOMweb plugin; scripts/test.sh installs it)"
    return None


class Orthanc:
    """One Orthanc process; ``dicomweb_servers`` are the DICOMweb peers it may send to
    (``DicomWeb.Servers`` of its configuration: name -> {"Url": ..., "HttpHeaders": {...}})."""

    def __init__(self, workdir: Path, *, dicomweb_servers: dict[str, Any] | None = None) -> None:
        binary, plugin = orthanc_binary(), dicomweb_plugin()
        if binary is None or plugin is None:
            raise RuntimeError(missing_reason())
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "CXRREIDTEST",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "CXRREIDTEST",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "orthanc.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [binary, str(self.config_path)], cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc not answering /system after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def store(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM file through Orthanc's own REST API (``POST /instances``)."""
        response = httpx.post(f"{self.url}/instances", content=data, timeout=30)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
