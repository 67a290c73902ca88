/**
 * Hostile input at scale: a seeded fuzzer (tests/_fuzz_helpers.ts) sends
 * thousands of generated and mutated sessions — handshake flags, option
 * sequences, requests with odd flags, types, offsets and lengths, payloads
 * cut short, connections reset at random points — to three servers: the
 * memory plugin, a "chaos" plugin that answers late and throws every kind of
 * value, and a read-only server without structured replies that runs one
 * request at a time. Unmutated cases are checked reply by reply. Between
 * batches a control client writes and reads back random data, the server's
 * resident memory is checked against a bound, and at the end nbdsh does the
 * same and every plugin handle must be closed. Then hostile clients one by
 * one: silent or trickling handshakes (--timeout), resets right after
 * EXPORT_NAME, refused 48 MiB payloads, reads of ever-new sizes, and a
 * client that sends requests but never reads a reply.
 *
 * The same cases run against nbdkit 1.32 with `tests/fuzz_nbdkit.sh`, which
 * is not part of the suite (nbdkit aborting is not our failure).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { nbdsh, requireTool, scratch, startTestServer, type TestServer } from "./helpers.ts";
import {
  alive,
  CHAOS_PLUGIN,
  floodWithoutReading,
  generate,
  generatorFingerprint,
  rssKiB,
  runCase,
  runMany,
  type Target,
} from "./_fuzz_helpers.ts";
import { CMD, concat, OPT, RawClient, u32, u64 } from "./raw_client.ts";

const SIZE = 4 * 1024 * 1024;
/** The chaos plugin fails requests that reach into the last 64 KiB. */
const FAIL_FROM = SIZE - 65536;

/** Cases per server (memory, chaos, read-only): a few thousand in all, well under a minute. */
const CASES = { memory: 2500, chaos: 2500, readonly: 1000 };
/** Cases run at once. */
const PARALLEL = 8;
/** A control client checks the server after every this many cases. */
const EVERY = 250;
/** Resident memory may grow this much over the first reading (KiB). */
const RSS_GROWTH_KIB = 256 * 1024;

/** What the generator produced when the regression seeds were found. */
const FINGERPRINT = "1a542672";

/**
 * Seeds that found bugs, run before anything else. Each names a case of the
 * generator whose fingerprint is {@linkcode FINGERPRINT}.
 */
const REGRESSION_SEEDS: { server: "memory" | "chaos" | "readonly"; seed: number; found: string }[] =
  [
    {
      server: "chaos",
      seed: 1000078,
      found: "a plugin that throws Object.create(null) took the server down: messageOf() " +
        "threw inside the request's catch block, an unhandled rejection (plugins/errors.ts messageOf now never throws)",
    },
    {
      server: "chaos",
      seed: 1006602,
      found: "extents of NaN length from a plugin went on the wire as a zero-length " +
        "extent (server/backend.ts now refuses them with EIO)",
    },
    { server: "chaos", seed: 1007626, found: "the same bug, by a BLOCK_STATUS of 8 bytes" },
    {
      server: "chaos",
      seed: 1001127,
      found: "EXPORT_NAME, then a reset before the reply: the plugin handle was never " +
        "closed (protocol/handshake.ts); timing-dependent, see the test below",
    },
  ];

describe("fuzzing", () => {
  const servers: Record<string, TestServer> = {};
  const targets: Record<string, Target> = {
    memory: { size: SIZE, readonly: false },
    chaos: { size: SIZE, readonly: false, failFrom: FAIL_FROM },
    readonly: { size: SIZE, readonly: true },
  };
  const baseline: Record<string, number> = {};
  let dir: string;
  let cleanup: () => void;

  before(async () => {
    requireTool("nbdsh");
    ({ dir, cleanup } = scratch());
    writeFileSync(join(dir, "chaos.js"), CHAOS_PLUGIN);
    [servers.memory, servers.chaos, servers.readonly] = await Promise.all([
      startTestServer(["memory", `size=${SIZE}`]),
      startTestServer([
        join(dir, "chaos.js"),
        `size=${SIZE}`,
        `failFrom=${FAIL_FROM}`,
        `stats=${join(dir, "stats")}`,
      ]),
      startTestServer(["-r", "--no-sr", "-t", "1", "memory", `size=${SIZE}`]),
    ]);
    for (const name of Object.keys(servers)) {
      await control(name);
      baseline[name] = rssKiB(servers[name].pid);
    }
  });

  after(async () => {
    for (const s of Object.values(servers)) assert.equal(await s.stop(), 0);
    cleanup();
  });

  /** A well-behaved client writes random bytes and reads them back (reads only when read-only). */
  let round = 0;
  async function control(name: string): Promise<void> {
    const server = servers[name];
    assert.ok(alive(server.pid), `${name}: the server is gone: ${server.stderr().slice(-2000)}`);
    const c = await RawClient.connect(server.socket);
    try {
      const { size } = await c.go();
      assert.equal(size, BigInt(SIZE));
      const offset = BigInt((round++ * 65536 + 4096) % FAIL_FROM);
      if (!targets[name].readonly) {
        const data = crypto.getRandomValues(new Uint8Array(65536 - 4096));
        c.request(CMD.WRITE, offset, data.length, { cookie: 1n, payload: data });
        assert.equal((await c.simpleReply())?.error, 0);
        c.request(CMD.READ, offset, data.length, { cookie: 2n });
        const back = await c.simpleReply(data.length);
        assert.equal(back?.error, 0);
        assert.deepEqual(back?.data, data);
      } else {
        c.request(CMD.READ, offset, 4096, { cookie: 2n });
        assert.equal((await c.simpleReply(4096))?.error, 0);
      }
    } finally {
      c.destroy();
    }
  }

  function checkMemory(name: string): void {
    const rss = rssKiB(servers[name].pid);
    assert.ok(
      rss > 0 && rss < baseline[name] + RSS_GROWTH_KIB,
      `${name}: resident memory ${rss} KiB, started at ${baseline[name]} KiB`,
    );
  }

  /** Every line on the server's stderr is one of ours: no stack trace, no runtime warning. */
  function checkStderr(name: string): void {
    for (const line of servers[name].stderr().split("\n")) {
      if (line === "") continue;
      assert.match(line, /^nbdkit-ts: \w+\[\d+\]: (error|debug): \S/, `${name}: ${line}`);
    }
  }

  test("the generator is the one the regression seeds were found with", () => {
    assert.equal(
      generatorFingerprint(),
      FINGERPRINT,
      "the fuzzer's generator changed: find the regression seeds again (see REGRESSION_SEEDS)",
    );
  });

  test("regression seeds", async () => {
    for (const { server, seed, found } of REGRESSION_SEEDS) {
      const target = targets[server];
      try {
        await runCase(servers[server].socket, generate(seed, target), target);
      } catch (err) {
        assert.fail(`seed ${seed} (${found}): ${err}`);
      }
      await control(server);
    }
  });

  for (
    const [name, first] of [["memory", 1], ["chaos", 1_000_001], ["readonly", 2_000_001]] as const
  ) {
    test(`${CASES[name]} cases against ${name}`, async () => {
      const server = servers[name];
      const started = Date.now();
      const seeds = Array.from({ length: CASES[name] }, (_, i) => first + i);
      const failures = await runMany(server.socket, targets[name], seeds, {
        parallel: PARALLEL,
        every: EVERY,
        stop: () => !alive(server.pid),
        between: async () => {
          await control(name);
          checkMemory(name);
        },
      });
      assert.deepEqual(failures, [], `failed seeds (rerun one with runCase to debug)`);
      assert.ok(alive(server.pid));
      checkStderr(name);
      console.log(
        `${name}: ${CASES[name]} cases in ${Date.now() - started} ms, ` +
          `resident ${rssKiB(server.pid)} KiB (started at ${baseline[name]} KiB)`,
      );
    });
  }

  test("a real client reads and writes correct data afterwards", () => {
    for (const name of ["memory", "chaos"]) {
      const r = nbdsh(
        servers[name].uri,
        `import os
data = os.urandom(1 << 20)
h.pwrite(data, 1 << 20)
assert h.pread(1 << 20, 1 << 20) == data
print("ok")`,
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.trim(), "ok");
    }
    const r = nbdsh(servers.readonly.uri, `print(len(h.pread(65536, ${SIZE - 65536})))`);
    assert.equal(r.stdout.trim(), "65536", r.stderr);
  });

  test("every plugin handle opened was closed", async () => {
    const stats = () => readFileSync(join(dir, "stats"), "utf8").trim().split(" ").map(Number);
    for (let i = 0; i < 100 && stats()[0] !== stats()[1]; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const [opens, closes] = stats();
    assert.ok(opens > 500, `only ${opens} opens`);
    assert.equal(closes, opens);
  });
});

describe("hostile clients", () => {
  let server: TestServer;
  let dir: string;
  let cleanup: () => void;

  before(async () => {
    ({ dir, cleanup } = scratch());
    writeFileSync(join(dir, "chaos.js"), CHAOS_PLUGIN);
    server = await startTestServer([
      "--timeout=1",
      join(dir, "chaos.js"),
      `size=${SIZE}`,
      `stats=${join(dir, "stats")}`,
    ]);
  });

  after(async () => {
    assert.equal(await server.stop(), 0);
    cleanup();
  });

  test("a client that connects and sends nothing is dropped after --timeout", async () => {
    const started = Date.now();
    const c = await RawClient.connect(server.socket);
    assert.ok(await c.read(18)); // the greeting
    assert.equal(await c.closedWithin(5000), true);
    const took = Date.now() - started;
    assert.ok(took >= 900 && took < 4000, `dropped after ${took} ms`);
    assert.match(
      await server.waitForStderr(/did not finish the handshake within 1 seconds/),
      /error: client did not finish the handshake within 1 seconds/,
    );
  });

  test("a client that trickles the handshake is dropped too", async () => {
    const started = Date.now();
    const c = await RawClient.connect(server.socket);
    await c.greet();
    // A valid LIST option, one byte every 100 ms: complete only after 2 s.
    const option = concat(u64(0x49484156454f5054n), u32(OPT.LIST), u32(0));
    for (const byte of option) {
      c.send(new Uint8Array([byte]));
      await new Promise((r) => setTimeout(r, 100));
      if (await c.closedWithin(0)) break;
    }
    assert.equal(await c.closedWithin(5000), true);
    const took = Date.now() - started;
    assert.ok(took >= 900 && took < 4000, `dropped after ${took} ms`);
  });

  test("a connection that finished the handshake is not timed out", async () => {
    const c = await RawClient.connect(server.socket);
    await c.go();
    await new Promise((r) => setTimeout(r, 1500));
    c.request(CMD.READ, 0n, 512, { cookie: 5n });
    const r = await c.simpleReply(512);
    assert.equal(r?.error, 0);
    assert.equal(r?.cookie, 5n);
    c.destroy();
  });

  test("clients that leave right after EXPORT_NAME leave no plugin handle open", async () => {
    const hello = concat(u32(3), u64(0x49484156454f5054n), u32(OPT.EXPORT_NAME), u32(0));
    for (let i = 0; i < 200; i++) {
      const c = await RawClient.connect(server.socket);
      c.send(hello);
      if (i % 4 === 0) {
        // Leave once the export is open: its reply (size and flags) has come.
        assert.ok(await c.read(18), "the greeting");
        assert.ok(await c.read(10), "the EXPORT_NAME reply");
      } else {
        // Leave at a varying moment around the server's reply.
        await new Promise((r) => setTimeout(r, i % 3));
      }
      c.destroy();
    }
    const stats = () => readFileSync(join(dir, "stats"), "utf8").trim().split(" ").map(Number);
    for (let i = 0; i < 100 && stats()[0] !== stats()[1]; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const [opens, closes] = stats();
    // The 50 that waited for their reply certainly opened; how many of the
    // others did depends on timing (25 to 99 of the 150 seen).
    assert.ok(opens >= 50, `only ${opens} opens`);
    assert.equal(closes, opens, `${opens - closes} handles left open`);
  });

  test("refused WRITE payloads are skipped, never held in memory", async () => {
    // Eight clients at once each send 48 MiB that the server must refuse (out
    // of range): before the fix each payload was read whole, then refused.
    const pid = server.pid;
    const peakBefore = peakKiB(pid);
    const payload = new Uint8Array(48 * 1024 * 1024).fill(0x5a);
    await Promise.all(Array.from({ length: 8 }, async (_, i) => {
      const c = await RawClient.connect(server.socket);
      await c.go();
      c.request(CMD.WRITE, BigInt(SIZE), payload.length, { cookie: BigInt(i), payload });
      // The reply follows the whole skipped payload, 384 MiB in all: 3 s on an
      // idle machine, over 10 s on a loaded one (a fresh-clone run, 998de1c).
      const r = await c.simpleReply(0, 60_000);
      assert.equal(r?.error, 28); // ENOSPC: a write past the end
      c.destroy();
    }));
    const grew = peakKiB(pid) - peakBefore;
    // Measured: 40-75 MiB (garbage of the skipped chunks); 430 MiB before the fix.
    assert.ok(grew < 192 * 1024, `peak resident memory grew by ${grew} KiB`);
  });
});

describe("memory held for clients", () => {
  test("reads of ever-different sizes do not pile up reply buffers", async () => {
    const server = await startTestServer(["memory", "size=16M"]);
    try {
      const c = await RawClient.connect(server.socket);
      await c.go();
      const before = rssKiB(server.pid);
      // Before the fix every size kept its buffers for ever: 1.5 GiB after 1500 reads.
      for (let k = 1; k <= 600; k++) {
        c.request(CMD.READ, 0n, 1024 * 1024 + k, { cookie: BigInt(k) });
        assert.equal((await c.simpleReply(1024 * 1024 + k))?.error, 0);
      }
      c.destroy();
      const grew = rssKiB(server.pid) - before;
      assert.ok(grew < 256 * 1024, `resident memory grew by ${grew} KiB`);
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test("a client that never reads its replies cannot grow it without bound", async () => {
    const server = await startTestServer(["memory", "size=16M"]);
    try {
      const before = rssKiB(server.pid);
      // 4 KiB READs: 28 bytes asked, 4 KiB answered. Before the fix the
      // server queued the replies without limit (3.5 GiB in 8 seconds).
      const { sent, socket } = await floodWithoutReading(server.socket, 4096, 3000);
      const grew = rssKiB(server.pid) - before;
      socket.destroy();
      assert.ok(grew < 160 * 1024, `resident memory grew by ${grew} KiB after ${sent} requests`);
      const r = nbdsh(server.uri, "print(len(h.pread(4096, 0)))");
      assert.equal(r.stdout.trim(), "4096", r.stderr);
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });
});

/** Peak resident memory (VmHWM) of a process in KiB. */
function peakKiB(pid: number): number {
  const m = /VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) : -1;
}
