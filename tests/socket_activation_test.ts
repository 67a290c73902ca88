/**
 * Socket activation (`LISTEN_PID`, `LISTEN_FDS`), as libnbd's clients use it
 * with nbdkit: `nbdinfo -- [ nbdkit-ts … ]`, `nbdcopy -- [ … ] -`, nbdsh's
 * `connect_systemd_socket_activation`. The client makes the socket, starts
 * the server on it, and stops the server when it is done.
 *
 * @module
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { ourCommand, ourShell, requireTool, run, scratch, sh, shAsync } from "./helpers.ts";

describe("socket activation", () => {
  let dir: string;
  let cleanup: () => void;
  before(() => {
    for (const tool of ["nbdinfo", "nbdcopy", "nbdsh", "sha256sum"]) requireTool(tool);
    ({ dir, cleanup } = scratch());
  });
  after(() => cleanup());

  test("nbdinfo -- [ nbdkit-ts … ] and nbdsh's connect_systemd_socket_activation", async () => {
    const info = await shAsync(`nbdinfo --size -- [ ${ourShell()} memory size=1M ]`);
    assert.equal(info.status, 0, info.stderr);
    assert.equal(info.stdout, "1048576\n");
    const argv = JSON.stringify([...ourCommand(), "memory", "size=4M"]);
    const py = `h.connect_systemd_socket_activation(${argv})
h.pwrite(b"abc", 100)
print(h.pread(5, 99), h.get_size())`;
    const r = await run(["nbdsh", "-c", py], { env: {} });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "bytearray(b'\\x00abc\\x00') 4194304\n");
  });

  test("nbdcopy -- [ nbdkit-ts file ] - | sha256sum: the bytes, through a stdout we share", async () => {
    // The server inherits nbdcopy's stdout (the pipe into sha256sum): it must
    // leave it blocking, or nbdcopy's writes fail with EAGAIN (Node did).
    const file = join(dir, "disk.raw");
    assert.equal(sh(`head -c 32M /dev/urandom > ${file}`).status, 0);
    const want = sh(`sha256sum < ${file}`).stdout;
    // timeout: a failed nbdcopy leaves the server running, holding the pipe open.
    const r = await shAsync(
      `timeout -k 5 60 sh -c 'nbdcopy -- [ ${ourShell()} -r file ${file} ] - | sha256sum'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, want);
    assert.equal(r.stderr, "");
  });

  test("with -s, -U, -p, -i or --run: one line, exit status 1, as nbdkit", async () => {
    const r = await shAsync(`nbdinfo --size -- [ ${ourShell()} -s memory size=1M ]`);
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /^nbdkit-ts: error: cannot use socket activation with -s$/m);
    const u = await shAsync(`nbdinfo --size -- [ ${ourShell()} -U ${join(dir, "s")} null 512 ]`);
    assert.match(u.stderr, /^nbdkit-ts: error: cannot use socket activation with -U$/m);
  });

  test("LISTEN_PID of another process is not ours: the server opens its own socket", async () => {
    const r = await shAsync(
      `LISTEN_PID=1 LISTEN_FDS=1 ${ourShell()} -U - memory size=1M --run 'nbdinfo --size "$uri"'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "1048576\n");
  });
});
