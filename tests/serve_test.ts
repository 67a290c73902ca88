/**
 * `serve()`: an NBD server embedded in the test's own process, driven by
 * real clients (nbdinfo, nbdsh) run as async child processes — a
 * synchronous spawn would block the event loop the server runs on.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomFillSync } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { definePlugin, EXTENT_HOLE, EXTENT_ZERO, NbdError, type Plugin, serve } from "../mod.ts";
import { requireTool, run, scratch } from "./helpers.ts";

/** nbdsh's Python, run against `uri`; its stdout, trimmed (fails on a non-zero exit). */
async function nbdsh(uri: string, python: string, options: string[] = []): Promise<string> {
  const r = await run(["nbdsh", ...options, "-u", uri, "-c", python]);
  assert.equal(r.status, 0, `nbdsh: ${r.stderr}`);
  return r.stdout.trim();
}

/** `nbdinfo --json` of the first export. */
async function nbdinfo(uri: string): Promise<Record<string, unknown>> {
  const r = await run(["nbdinfo", "--json", uri]);
  assert.equal(r.status, 0, `nbdinfo: ${r.stderr}`);
  return JSON.parse(r.stdout).exports[0];
}

/** Python that prints the errno name of a failing call, or "ok". */
const errnoOf = (call: string) =>
  `import errno\ntry:\n  ${call}\n  print("ok")\nexcept nbd.Error as e:\n  print(errno.errorcode[e.errnum])`;

/** A RAM disk with a `size` parameter that records its lifecycle. */
function ramdisk() {
  const calls: string[] = [];
  let disk = new Uint8Array(0);
  const plugin = definePlugin({
    name: "ramdisk",
    config(key, value) {
      if (key !== "size") throw new Error(`unknown parameter '${key}'`);
      disk = new Uint8Array(Number(value));
      calls.push(`config ${key}=${value}`);
    },
    configComplete: () => void calls.push("configComplete"),
    getReady: () => void calls.push("getReady"),
    unload: () => void calls.push("unload"),
    open: ({ exportName }) => ({ disk, exportName }),
    getSize: (h) => h.disk.length,
    pread: (h, buf, offset) => void buf.set(h.disk.subarray(offset, offset + buf.length)),
    pwrite(h, buf, offset) {
      if (buf[0] === 0xee) throw new NbdError("ENOSPC", "refusing a write of 0xee");
      h.disk.set(buf, offset);
    },
  });
  return { plugin, calls, disk: () => disk };
}

describe("serve(): an NBD server inside your program", () => {
  let dir: string;
  let cleanup: () => void;

  before(() => {
    for (const tool of ["nbdinfo", "nbdsh"]) requireTool(tool);
    ({ dir, cleanup } = scratch());
  });
  after(() => cleanup());

  test("a definePlugin plugin on a Unix socket; close() removes the socket and unloads", async () => {
    const { plugin, calls, disk } = ramdisk();
    const socket = join(dir, "ram.sock");
    const server = await serve(plugin, { unixSocket: socket, config: { size: "65536" } });
    try {
      assert.deepEqual(calls, ["config size=65536", "configComplete", "getReady"]);
      assert.deepEqual(server.address, { transport: "unix", path: socket });
      assert.equal(server.uri, `nbd+unix:///?socket=${socket}`);
      assert.ok(existsSync(socket));

      const info = await nbdinfo(server.uri);
      assert.equal(info["export-size"], 65536);
      assert.equal(info.is_read_only, false);

      const out = await nbdsh(
        server.uri,
        `h.pwrite(b"hello", 4094)\nprint(h.pread(5, 4094).decode())\n` +
          errnoOf(`h.pwrite(b"\\xee", 0)`),
      );
      assert.equal(out, "hello\nENOSPC");
      assert.equal(new TextDecoder().decode(disk().subarray(4094, 4099)), "hello");
      assert.equal(server.connections, 0);
    } finally {
      await server.close();
    }
    await server.finished;
    assert.equal(existsSync(socket), false);
    assert.equal(calls.at(-1), "unload");
    // A second close() is harmless.
    await server.close();
  });

  test("port 0 picks a free port on the address asked for; the URI names it", async () => {
    const { plugin } = ramdisk();
    const server = await serve(plugin, {
      hostname: "127.0.0.1",
      port: 0,
      config: { size: "4096" },
    });
    let uri: string;
    try {
      const address = server.address;
      assert.ok(address?.transport === "tcp");
      assert.equal(address.hostname, "127.0.0.1");
      assert.ok(address.port > 0);
      uri = server.uri;
      assert.equal(uri, `nbd://127.0.0.1:${address.port}`);
      const r = await run(["nbdinfo", "--size", uri]);
      assert.equal(r.stdout.trim(), "4096", r.stderr);
    } finally {
      await server.close();
    }
    const refused = await run(["nbdinfo", "--size", uri]);
    assert.notEqual(refused.status, 0, "the server still answers after close()");
  });

  test("capabilities follow the callbacks: no pwrite is read-only", async () => {
    const readonly = definePlugin({
      name: "zeroes",
      open: () => null,
      getSize: () => 1 << 20,
      pread: (_h, buf) => void buf.fill(0),
    });
    const server = await serve(readonly, { unixSocket: join(dir, "ro.sock") });
    try {
      const info = await nbdinfo(server.uri);
      assert.equal(info.is_read_only, true);
      for (const flag of ["can_flush", "can_trim", "can_fua", "can_cache", "can_multi_conn"]) {
        assert.equal(info[flag], false, flag);
      }
      assert.equal(await nbdsh(server.uri, errnoOf(`h.pwrite(b"x", 0)`)), "EPERM");
    } finally {
      await server.close();
    }
  });

  test("capabilities follow the callbacks: flush, trim, zero, extents", async () => {
    const blocks = new Set<number>(); // 64 KiB blocks that hold data
    const full: Plugin<null> = {
      name: "full",
      open: () => null,
      getSize: () => 1 << 20,
      pread: (_h, buf) => void buf.fill(0),
      pwrite: (_h, _buf, offset) => void blocks.add(Math.floor(offset / 65536)),
      flush() {},
      trim: (_h, _count, offset) => void blocks.delete(Math.floor(offset / 65536)),
      zero: (_h, _count, offset) => void blocks.delete(Math.floor(offset / 65536)),
      extents(_h, count, offset, _flags, sink) {
        for (let at = offset; at < offset + count; at += 65536) {
          sink.add(at, 65536, blocks.has(at / 65536) ? 0 : EXTENT_HOLE | EXTENT_ZERO);
        }
      },
    };
    const server = await serve(full, { unixSocket: join(dir, "full.sock") });
    try {
      const info = await nbdinfo(server.uri);
      assert.equal(info.is_read_only, false);
      // FUA is emulated with flush when the plugin has flush but no canFua.
      for (const flag of ["can_flush", "can_trim", "can_zero", "can_fua"]) {
        assert.equal(info[flag], true, flag);
      }
      assert.deepEqual(info.contexts, ["base:allocation"]);
      const out = await nbdsh(
        server.uri,
        `h.pwrite(b"x" * 512, 65536)
seen = []
def f(meta, offset, entries, err):
    seen.extend(entries)
h.block_status(3 * 65536, 0, f)
print(seen)`,
        ["--base-allocation"],
      );
      assert.equal(out, "[65536, 3, 65536, 0, 65536, 3]");
    } finally {
      await server.close();
    }
  });

  test("readonly and exportName options", async () => {
    const { plugin } = ramdisk();
    const server = await serve(plugin, {
      unixSocket: join(dir, "opts.sock"),
      readonly: true,
      exportName: "disk1",
      config: { size: "512" },
    });
    try {
      assert.equal(server.uri, `nbd+unix:///disk1?socket=${join(dir, "opts.sock")}`);
      const info = await nbdinfo(server.uri);
      assert.equal(info["export-name"], "disk1");
      assert.equal(info.is_read_only, true);
      const list = await run(["nbdinfo", "--list", "--json", server.uri]);
      assert.deepEqual(
        JSON.parse(list.stdout).exports.map((e: { "export-name": string }) => e["export-name"]),
        ["disk1"],
      );
    } finally {
      await server.close();
    }
  });

  test("pread may lend its own bytes: sent as they are, released once written", async () => {
    // 8 MiB of random bytes, read back by nbdcopy (256 KiB requests, many in
    // flight) and by nbdsh (small reads, batched). Each read is lent a copy
    // from a small pool; a release scribbles over it and hands it back, so a
    // reply still being written after its release would carry 0xee bytes.
    const size = 8 << 20;
    const disk = randomFillSync(new Uint8Array(size));
    const pool: Uint8Array[] = [];
    let lent = 0;
    let released = 0;
    const plugin = definePlugin({
      name: "lender",
      open: () => null,
      getSize: () => size,
      pread(_h, buf, offset) {
        // Bad loans, each at its own offset: the wrong length, no byte array, a release that throws.
        if (offset === size - 4096 && buf.length === 17) return { bytes: new Uint8Array(16) };
        if (offset === size - 8192) return { bytes: "not bytes" as unknown as Uint8Array };
        if (offset === size - 12288) {
          return {
            bytes: disk.subarray(offset, offset + buf.length),
            release() {
              throw new Error("release failed");
            },
          };
        }
        const spare = pool.pop();
        const whole = spare && spare.length >= buf.length
          ? spare
          : new Uint8Array(Math.max(buf.length, 256 * 1024));
        const bytes = whole.subarray(0, buf.length);
        bytes.set(disk.subarray(offset, offset + buf.length));
        lent++;
        let once = false;
        return {
          bytes,
          release() {
            assert.equal(once, false, "released twice");
            once = true;
            released++;
            whole.fill(0xee);
            pool.push(whole);
          },
        };
      },
    });
    const server = await serve(plugin, { unixSocket: join(dir, "lend.sock") });
    try {
      const copy = await run([
        "/bin/sh",
        "-c",
        `nbdcopy '${server.uri}' - | sha256sum`,
      ]);
      assert.equal(copy.status, 0, copy.stderr);
      const want = createHash("sha256").update(disk).digest("hex");
      assert.equal(copy.stdout.split(" ")[0], want);
      const out = await nbdsh(
        server.uri,
        `import hashlib\n` +
          `print(hashlib.sha256(b"".join(h.pread(4096, o) for o in range(0, 1 << 20, 4096))).hexdigest())\n` +
          errnoOf(`h.pread(17, ${size - 4096})`) + "\n" +
          errnoOf(`h.pread(512, ${size - 8192})`) +
          `\nprint(h.pread(512, ${size - 12288}).hex())` +
          `\nprint(len(h.pread(512, 0)))`,
      );
      const small = createHash("sha256").update(disk.subarray(0, 1 << 20)).digest("hex");
      // The loan whose release threw was sent once, whole: the next reply still lines up.
      const afterThrow = Array.from(disk.subarray(size - 12288, size - 12288 + 512))
        .map((b) => b.toString(16).padStart(2, "0")).join("");
      assert.equal(out, `${small}\nEIO\nEIO\n${afterThrow}\n512`);
    } finally {
      await server.close();
    }
    assert.ok(lent >= size / (256 * 1024) + 256);
    assert.equal(released, lent, "every loan released once");
  });

  test("reads and writes answered synchronously, by a promise or by a thenable; a throw fails one request", async () => {
    // Each 64 KiB region of the disk answers its own way. A synchronous
    // answer is sent at once, the others when they settle: either way a write
    // is acknowledged only once the plugin has it.
    const REGION = 65536;
    const disk = new Uint8Array(5 * REGION);
    let writing = 0;
    const early: number[] = [];
    const thenable = <T>(fn: () => T) => ({
      then(ok: (v: T) => void, bad: (e: unknown) => void) {
        setTimeout(() => {
          try {
            ok(fn());
          } catch (err) {
            bad(err);
          }
        }, 20);
      },
    });
    const later = <T>(fn: () => T) => new Promise<T>((ok, bad) => thenable(fn).then(ok, bad));
    const answer = <T>(offset: number, fn: () => T): unknown => {
      switch (Math.floor(offset / REGION)) {
        case 0:
          return fn();
        case 1:
          return later(fn);
        case 2:
          return thenable(fn);
        case 3:
          throw new NbdError("ENOSPC", "region 3 refuses synchronously");
        default:
          return later(() => {
            throw new NbdError("EPERM", "region 4 refuses later");
          });
      }
    };
    const plugin = definePlugin({
      name: "answers",
      open: () => null,
      getSize: () => disk.length,
      pread(_h, buf, offset) {
        // nbdsh waits for each reply: a write still running is one acknowledged too soon.
        if (writing > 0) early.push(offset);
        return answer(
          offset,
          () => void buf.set(disk.subarray(offset, offset + buf.length)),
        ) as void;
      },
      pwrite(_h, buf, offset) {
        const writes = offset < 3 * REGION; // regions 3 and 4 refuse
        if (writes) writing++;
        return answer(offset, () => {
          writing--;
          disk.set(buf, offset);
        }) as void;
      },
    });
    const server = await serve(plugin, { unixSocket: join(dir, "answers.sock") });
    try {
      const python = [0, 1, 2, 3, 4].map((r) => {
        const at = r * REGION + 512;
        return `d = bytes([${r + 1}]) * 4096\n` +
          errnoOf(`h.pwrite(d, ${at})`) + "\n" +
          errnoOf(`assert h.pread(4096, ${at}) == d`);
      }).join("\n");
      const out = await nbdsh(server.uri, python);
      assert.equal(out, "ok\nok\nok\nok\nok\nok\nENOSPC\nENOSPC\nEPERM\nEPERM");
      assert.deepEqual(early, [], "reads that came while a write was still running");
      for (const r of [0, 1, 2]) {
        const at = r * REGION + 512;
        assert.ok(disk.subarray(at, at + 4096).every((b) => b === r + 1), `region ${r}`);
      }
      assert.ok(
        disk.subarray(3 * REGION).every((b) => b === 0),
        "the refused writes wrote nothing",
      );
      // Many in flight at once, mixed: every reply matches its request.
      const mixed = await nbdsh(
        server.uri,
        `rs = (0, 1, 2) * 20\n` +
          `bufs = [nbd.Buffer(4096) for r in rs]\n` +
          `for b, r in zip(bufs, rs): h.aio_pread(b, r * ${REGION} + 512)\n` +
          `while h.aio_in_flight() > 0: h.poll(-1)\n` +
          `print(all(b.to_bytearray() == bytes([r + 1]) * 4096 for b, r in zip(bufs, rs)))`,
      );
      assert.equal(mixed, "True");
    } finally {
      await server.close();
    }
  });

  test("a bad parameter rejects serve() and nothing listens", async () => {
    const socket = join(dir, "bad.sock");
    const noConfig = definePlugin({
      name: "fixed",
      open: () => null,
      getSize: () => 512,
      pread: () => {},
    });
    await assert.rejects(serve(noConfig, { unixSocket: socket, config: { size: "1" } }), {
      message: "unknown parameter 'size'",
    });
    const { plugin } = ramdisk();
    await assert.rejects(serve(plugin, { unixSocket: socket, config: { colour: "red" } }), {
      message: "unknown parameter 'colour'",
    });
    assert.equal(existsSync(socket), false);
  });
});
