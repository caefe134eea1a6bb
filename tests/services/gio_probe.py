"""A D-Bus client on targetcli's own stack (GLib's Gio), run as a separate process.

Usage: ``python3 gio_probe.py '<json list of operations>'`` (or ``python3 -c "$(cat
gio_probe.py)" '<json>'``, for a user who cannot read the checkout); prints one JSON result per
operation, in order.  The bus is the "system bus" of the environment
(``DBUS_SYSTEM_BUS_ADDRESS``), exactly as targetcli finds it.  Runs on Debian's
interpreter, where python3-gi and targetcli-fb live, and may run as an unprivileged user.

Operations:
  {"op": "own", "name": N}                      RequestName(N, DO_NOT_QUEUE) -> reply code
  {"op": "call", "dest": D, "path": P, "iface": I, "member": M, "sig": "(s)", "args": [...]}
  {"op": "targetcli_backstores"}                [[name, ConfigDesc], ...] via targetcli's code
  {"op": "targetcli_check", "handler": H, "cfgstring": C}
                                                what `create ... cfgstring=C` asks the runner
Each result is {"ok": value} or {"error": "<D-Bus error text>"}.
"""

import json
import sys

from gi.repository import Gio, GLib

TIMEOUT_MS = 10000


def _bus() -> Gio.DBusConnection:
    return Gio.bus_get_sync(Gio.BusType.SYSTEM, None)


def own(name: str) -> object:
    reply = _bus().call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "RequestName", GLib.Variant("(su)", (name, 4)), None,
                             Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)
    return reply.unpack()[0]


def call(dest: str, path: str, iface: str, member: str, sig: str, args: list) -> object:
    params = GLib.Variant(sig, tuple(args)) if sig else None
    reply = _bus().call_sync(dest, path, iface, member, params, None, Gio.DBusCallFlags.NONE,
                             TIMEOUT_MS, None)
    return reply.unpack() if reply is not None else None


def _user_backstores() -> list:
    """targetcli's UIBackstores._user_backstores (it does not use ``self``)."""
    from targetcli.ui_backstore import UIBackstores

    return list(UIBackstores._user_backstores(None))


def targetcli_backstores() -> object:
    return [[name, props.get("org.kernel.TCMUService1", {}).get("ConfigDesc")]
            for name, _iface, props in _user_backstores()]


def targetcli_check(handler: str, cfgstring: str) -> object:
    for name, iface, _props in _user_backstores():
        if name == handler:
            # ui_command_create: config = self.handler + "/" + cfgstring
            ok, errmsg = iface.CheckConfig("(s)", handler + "/" + cfgstring)
            return [ok, errmsg]
    raise LookupError(f"targetcli does not list user:{handler}")


def main() -> None:
    ops = json.loads(sys.argv[1])
    results = []
    for op in ops:
        kind = op.pop("op")
        try:
            results.append({"ok": globals()[kind](**op)})
        except GLib.Error as e:
            results.append({"error": e.message})
        except Exception as e:  # noqa: BLE001 - reported to the test, which judges it
            results.append({"error": f"{type(e).__name__}: {e}"})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
