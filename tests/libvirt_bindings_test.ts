/**
 * The libvirt bindings of the runtime running the tests, against a real
 * libvirtd: exact bytes, sizes, libvirt's own error messages, concurrency,
 * handles freed with peeks in flight, no leak over a thousand cycles, and a
 * remote connection over TCP.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { closeSync, openSync, readSync } from "node:fs";
import type {
  LibvirtBindings,
  LibvirtConnection,
  LibvirtError,
} from "../plugins/libvirt/bindings.ts";
import { RUNTIME } from "./helpers.ts";
import {
  type LibvirtEnv,
  must,
  type RemoteLibvirtd,
  setupLibvirt,
  startRemoteLibvirtd,
} from "./libvirt_env.ts";

const MiB = 1024 * 1024;

/** This runtime's binding, imported directly (runtime/libvirt/mod.ts picks the same one). */
async function load(): Promise<LibvirtBindings> {
  switch (RUNTIME) {
    case "deno":
      return (await import("../runtime/libvirt/deno.ts")).loadLibvirt();
    case "bun":
      return await (await import("../runtime/libvirt/bun.ts")).loadLibvirt();
    case "node":
      return await (await import("../runtime/libvirt/node.ts")).loadLibvirt();
  }
}

function fileBytes(path: string, offset: number, length: number): Uint8Array {
  const fd = openSync(path, "r");
  try {
    const buf = new Uint8Array(length);
    for (let at = 0; at < length;) {
      const n = readSync(fd, buf, at, length - at, offset + at);
      if (n === 0) break;
      at += n;
    }
    return buf;
  } finally {
    closeSync(fd);
  }
}

async function rejectsWith(p: Promise<unknown> | (() => unknown), message: string, code?: number) {
  try {
    await (typeof p === "function" ? p() : p);
  } catch (err) {
    assert.equal((err as LibvirtError).message, message);
    if (code !== undefined) assert.equal((err as LibvirtError).code, code);
    return;
  }
  assert.fail(`expected the error "${message}"`);
}

describe("libvirt bindings", () => {
  let env: LibvirtEnv;
  let lv: LibvirtBindings;
  let conn: LibvirtConnection;

  before(async () => {
    env = await setupLibvirt();
    lv = await load();
    conn = lv.connect("qemu:///system");
  });

  after(() => {
    conn?.close();
    env?.cleanup();
  });

  test("version is the library's", () => {
    const out = must("virsh", ["-c", "qemu:///system", "version"]);
    assert.match(out, new RegExp(`Using library: libvirt ${lv.version.replaceAll(".", "\\.")}\\b`));
  });

  test("connection is alive; XML lists the disks", () => {
    assert.equal(conn.isAlive(), true);
    const dom = conn.lookupDomain(env.domain);
    try {
      const xml = dom.xmlDesc();
      for (const d of env.disks) {
        assert.ok(xml.includes(`<source file='${d.path}'`), xml);
        assert.ok(xml.includes(`<target dev='${d.target}'`), xml);
      }
    } finally {
      dom.free();
    }
  });

  test("virDomainGetBlockInfo: capacity by target and by path", () => {
    const dom = conn.lookupDomain(env.domain);
    try {
      for (const d of env.disks) {
        assert.equal(dom.blockInfo(d.target).capacity, BigInt(d.size), d.target);
        assert.equal(dom.blockInfo(d.path).capacity, BigInt(d.size), d.path);
      }
    } finally {
      dom.free();
    }
  });

  test("peeks return the file's exact bytes (whole disk, concurrent 1 MiB peeks)", async () => {
    const sda = env.disk("sda");
    const dom = conn.lookupDomain(env.domain);
    try {
      const whole = new Uint8Array(sda.size);
      let next = 0;
      await Promise.all(Array.from({ length: 8 }, async () => {
        while (next < sda.size) {
          const at = next;
          next += MiB;
          await dom.blockPeek("sda", at, whole.subarray(at, at + MiB));
        }
      }));
      assert.equal(createHash("sha256").update(whole).digest("hex"), sda.sha256);
    } finally {
      dom.free();
    }
  });

  test("peeks at odd offsets and lengths, by target and by path, up to 4 MiB", async () => {
    const sdb = env.disk("sdb");
    const dom = conn.lookupDomain(env.domain);
    try {
      const cases = [[0, 1], [1, 511], [4095, 4097], [MiB - 3, 7], [0, sdb.size], [
        sdb.size - 1,
        1,
      ]];
      for (const [offset, length] of cases) {
        for (const name of [sdb.target, sdb.path]) {
          const buf = new Uint8Array(length);
          await dom.blockPeek(name, offset, buf);
          assert.deepEqual(buf, fileBytes(sdb.path, offset, length), `${name} ${offset}+${length}`);
        }
      }
      const big = new Uint8Array(4 * MiB);
      await dom.blockPeek("sda", 12345, big);
      assert.deepEqual(big, fileBytes(env.disk("sda").path, 12345, 4 * MiB));
    } finally {
      dom.free();
    }
  });

  test("errors carry libvirt's own messages", async () => {
    const dom = conn.lookupDomain(env.domain);
    try {
      await rejectsWith(
        () => conn.lookupDomain("nbdkit-ts-no-such-domain"),
        "Domain not found: no domain with matching name 'nbdkit-ts-no-such-domain'",
        42,
      );
      await rejectsWith(
        () => dom.blockInfo("/nope"),
        "invalid argument: invalid path /nope not assigned to domain",
        8,
      );
      await rejectsWith(
        dom.blockPeek("sdc", 0, new Uint8Array(512)),
        "Operation not supported: peeking is only supported for disk with 'raw' format not 'qcow2'",
        84,
      );
      await rejectsWith(
        dom.blockPeek("sdz", 0, new Uint8Array(512)),
        "invalid argument: disk 'sdz' not found in domain",
        8,
      );
      const sdb = env.disk("sdb");
      await rejectsWith(
        dom.blockPeek("sdb", sdb.size - 100, new Uint8Array(512)),
        `invalid argument: 'sdb' starting from ${sdb.size - 100} has only 100 bytes available`,
      );
      await rejectsWith(
        dom.blockPeek("sda", 0, new Uint8Array(4 * MiB + 1)),
        `block peek request too large for remote protocol, ${4 * MiB + 1} > ${4 * MiB}`,
        39,
      );
      await rejectsWith(
        () => lv.connect("qemu+tcp://127.0.0.1:1/system"),
        "unable to connect to server at '127.0.0.1:1': Connection refused",
      );
    } finally {
      dom.free();
    }
  });

  test("a read-only connection may not peek", async () => {
    const ro = lv.connect("qemu:///system", true);
    const dom = ro.lookupDomain(env.domain);
    try {
      assert.equal(dom.blockInfo("sda").capacity, BigInt(env.disk("sda").size));
      await rejectsWith(
        dom.blockPeek("sda", 0, new Uint8Array(512)),
        "operation forbidden: read only access prevents virDomainBlockPeek",
      );
    } finally {
      dom.free();
      ro.close();
    }
  });

  test("concurrent good and failing peeks each get their own result", async () => {
    const sda = env.disk("sda");
    const dom = conn.lookupDomain(env.domain);
    try {
      const expected = fileBytes(sda.path, 0, 64 * 65536);
      const results = await Promise.allSettled(Array.from({ length: 64 }, async (_, i) => {
        const buf = new Uint8Array(65536);
        await dom.blockPeek(i % 4 === 3 ? "sdc" : "sda", i * 65536, buf);
        return buf;
      }));
      results.forEach((r, i) => {
        if (i % 4 === 3) {
          assert.equal(r.status, "rejected");
          assert.match((r as PromiseRejectedResult).reason.message, /'raw' format not 'qcow2'/);
        } else {
          assert.equal(r.status, "fulfilled");
          const buf = (r as PromiseFulfilledResult<Uint8Array>).value;
          assert.deepEqual(buf, expected.subarray(i * 65536, (i + 1) * 65536));
        }
      });
    } finally {
      dom.free();
    }
  });

  test("free() with peeks in flight waits for them", async () => {
    const dom = conn.lookupDomain(env.domain);
    const bufs = Array.from({ length: 16 }, () => new Uint8Array(MiB));
    const peeks = bufs.map((b, i) => dom.blockPeek("sda", i * MiB, b));
    dom.free();
    await Promise.all(peeks);
    assert.deepEqual(bufs[15], fileBytes(env.disk("sda").path, 15 * MiB, MiB));
    await rejectsWith(dom.blockPeek("sda", 0, new Uint8Array(1)), "invalid domain pointer");
  });

  test("no leak across a thousand open/close cycles", async () => {
    const cycle = async () => {
      const dom = conn.lookupDomain(env.domain);
      try {
        dom.xmlDesc();
        dom.blockInfo("sda");
        await dom.blockPeek("sda", 0, new Uint8Array(4096));
        try {
          dom.blockInfo("nope");
        } catch {
          // the error path must not leak either
        }
      } finally {
        dom.free();
      }
    };
    for (let i = 0; i < 200; i++) await cycle(); // warm up allocators
    const before = process.memoryUsage().rss;
    for (let i = 0; i < 1000; i++) await cycle();
    const grown = process.memoryUsage().rss - before;
    assert.ok(grown < 16 * MiB, `RSS grew by ${(grown / MiB).toFixed(1)} MiB`);
  });

  describe("remote libvirtd over TCP", () => {
    let remote: RemoteLibvirtd;

    before(async () => {
      remote = await startRemoteLibvirtd();
    });

    after(async () => {
      await remote?.cleanup();
    });

    test("peeks over qemu+tcp return the same bytes; errors come back", async () => {
      const rconn = lv.connect(remote.uri);
      const dom = rconn.lookupDomain(env.domain);
      try {
        const buf = new Uint8Array(4 * MiB);
        await dom.blockPeek("sda", 3 * MiB + 1, buf);
        assert.deepEqual(buf, fileBytes(env.disk("sda").path, 3 * MiB + 1, 4 * MiB));
        await rejectsWith(
          dom.blockPeek("sdc", 0, new Uint8Array(512)),
          "Operation not supported: peeking is only supported for disk with 'raw' format not 'qcow2'",
        );
      } finally {
        dom.free();
        rconn.close();
      }
    });

    test("a stopped daemon: the connection dies with libvirt's message", async () => {
      const rconn = lv.connect(remote.uri);
      const dom = rconn.lookupDomain(env.domain);
      try {
        await remote.stop();
        await assert.rejects(dom.blockPeek("sda", 0, new Uint8Array(512)), (err: Error) => {
          assert.match(err.message, /socket|closed|End of file|Cannot (write|recv)/i);
          return true;
        });
        assert.equal(rconn.isAlive(), false);
      } finally {
        dom.free();
        rconn.close();
        await remote.restart();
      }
    });
  });
});
