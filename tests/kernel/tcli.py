"""Run several targetcli commands in one process, and report each one's outcome.

targetcli takes one command per invocation, and under TCG each start costs about ten
seconds (imports, D-Bus).  This drives the same code as ``targetcli CMD``: the
``TargetCLI`` shell class from the targetcli script itself (it carries targetcli's
default prefs) and its ``UIRoot``, so ``user:`` backstores are found over D-Bus
(``GetManagedObjects`` on org.kernel.TCMUService1) and ``create`` asks the runner's
``CheckConfig`` first, exactly as the real command line does.

usage: python3 tests/kernel/tcli.py 'cmd 1' 'cmd 2' ...
Unlike a shell script of targetcli calls, a failing command does not stop the batch:
every command runs, and each is framed in the output by two lines,
``### tcli: <command as JSON>`` and ``### tcli-result: {"ok": bool, "error": str}``, with
what targetcli printed in between.  Exit 0 unless the shell itself could not start.
Needs an interpreter that imports Debian's targetcli, rtslib_fb and gi (Debian's python3,
or a venv made with --system-site-packages).
"""

import importlib.machinery
import importlib.util
import json
import shutil
import sys
from typing import Any

MARK, RESULT = "### tcli: ", "### tcli-result: "


def targetcli_shell_class() -> Any:
    """The targetcli script's own ``TargetCLI(ConfigShell)``: a bare ConfigShell lacks its
    default prefs (an iSCSI TPG would stay disabled, for one)."""
    path = shutil.which("targetcli")
    if not path:
        raise SystemExit("tcli: no targetcli on PATH (Debian package targetcli-fb)")
    loader = importlib.machinery.SourceFileLoader("targetcli_main", path)
    spec = importlib.util.spec_from_loader("targetcli_main", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.TargetCLI


def main(cmds: list[str]) -> int:
    from targetcli.ui_root import UIRoot

    shell = targetcli_shell_class()("~/.targetcli")
    shell.prefs["color_mode"] = False
    root = UIRoot(shell, as_root=True)
    root.refresh()
    for cmd in cmds:
        print(MARK + json.dumps(cmd), flush=True)
        try:
            shell.run_cmdline(cmd)
            outcome = {"ok": True, "error": ""}
        except Exception as e:  # noqa: BLE001 - every failure is the test's to judge
            outcome = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.flush()
        print(RESULT + json.dumps(outcome), flush=True)
    return 0


def parse(output: str) -> list[dict[str, Any]]:
    """The batch's output as ``[{"cmd", "ok", "error", "output"}, ...]``, in order."""
    results: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in output.splitlines():
        if line.startswith(MARK):
            current = {"cmd": json.loads(line[len(MARK):]), "output": []}
        elif line.startswith(RESULT) and current is not None:
            current.update(json.loads(line[len(RESULT):]))
            current["output"] = "\n".join(current["output"])
            results.append(current)
            current = None
        elif current is not None:
            current["output"].append(line)
    return results


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
