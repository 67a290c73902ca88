/**
 * Hostile and broken clients: each gets the spec's answer or a closed
 * connection, a one-line message on stderr, and after each a well-behaved
 * client still reads back exactly what it wrote.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { nbdsh, requireTool, startTestServer, type TestServer } from "./helpers.ts";
import { CMD, concat, OPT, RawClient, u16, u32 } from "./raw_client.ts";

const EPERM = 1;
const ENOMEM = 12;
const EINVAL = 22;
const ENOSPC = 28;
const SIZE = 8 * 1024 * 1024;

/** A real client writes random bytes at a fresh offset and reads them back. */
let round = 0;
function control(server: TestServer): void {
  const offset = (round++ % 64) * 65536;
  const r = nbdsh(
    server.uri,
    `import os\ndata = os.urandom(65536)\nh.pwrite(data, ${offset})\nassert h.pread(65536, ${offset}) == data\nprint("ok")`,
  );
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), "ok");
}

describe("bad input", () => {
  let server: TestServer;
  let ro: TestServer;

  before(async () => {
    requireTool("nbdsh");
    server = await startTestServer(["memory", `size=${SIZE}`]);
    ro = await startTestServer(["-r", "memory", `size=${SIZE}`]);
  });

  after(async () => {
    assert.equal(await server.stop(), 0);
    assert.equal(await ro.stop(), 0);
  });

  test("garbage instead of the client flags closes the connection", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet(0xdeadbeef);
    assert.equal(await c.closedWithin(5000), true);
    assert.match(
      await server.waitForStderr(
        /nbdkit-ts: memory\[\d+\]: error: client sent unknown handshake flags 0xdeadbeef\n/,
      ),
      /nbdkit-ts: memory\[\d+\]: error: client sent unknown handshake flags 0xdeadbeef\n/,
    );
    control(server);
  });

  test("unknown client flags close the connection", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet(0x7);
    assert.equal(await c.closedWithin(5000), true);
    control(server);
  });

  test("an option longer than the limit closes the connection without reading it", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet();
    c.option(OPT.LIST, new Uint8Array(0), 0x7fffffff);
    assert.equal(await c.closedWithin(5000), true);
    assert.match(
      await server.waitForStderr(/too long: 2147483647 bytes/),
      /too long: 2147483647 bytes/,
    );
    control(server);
  });

  test("an option over 64 KiB is skipped and refused, and the client goes on (as nbdkit)", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet();
    c.option(OPT.GO, new Uint8Array(70_000));
    const known = await c.optionReply();
    assert.equal(known?.option, OPT.GO);
    assert.equal(known?.type, 0x80000009); // NBD_REP_ERR_TOO_BIG
    c.option(0x4242, new Uint8Array(1024 * 1024).fill(0x49)); // IHAVEOPT's first byte, many times
    const unknown = await c.optionReply();
    assert.equal(unknown?.option, 0x4242);
    assert.equal(unknown?.type, 0x80000001); // NBD_REP_ERR_UNSUP
    assert.equal((await c.sendGo()).size, BigInt(SIZE));
    c.request(CMD.READ, 0n, 512, { cookie: 8n });
    assert.equal((await c.simpleReply(512))?.error, 0);
    c.destroy();
    control(server);
  });

  test("a client without fixed newstyle gets NBD_REP_ERR_INVALID but for EXPORT_NAME (as nbdkit)", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet(0);
    c.option(OPT.LIST);
    const r = await c.optionReply();
    assert.equal(r?.option, OPT.LIST);
    assert.equal(r?.type, 0x80000003); // NBD_REP_ERR_INVALID
    c.option(OPT.EXPORT_NAME);
    const info = await c.read(8 + 2 + 124); // size, flags and the zeroes it did not refuse
    assert.equal(new DataView(info!.buffer).getBigUint64(0), BigInt(SIZE));
    c.request(CMD.READ, 0n, 512, { cookie: 9n });
    assert.equal((await c.simpleReply(512))?.error, 0);
    c.destroy();
  });

  test("an unknown option gets NBD_REP_ERR_UNSUP and the client goes on", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet();
    c.option(0x4242, new Uint8Array(10));
    const r = await c.optionReply();
    assert.equal(r?.type, 0x80000001);
    assert.equal(r?.option, 0x4242);
    await c.sendGo(); // ACK: transmission begins
    c.request(CMD.READ, 0n, 512, { cookie: 7n });
    const read = await c.simpleReply(512);
    assert.equal(read?.error, 0);
    assert.equal(read?.cookie, 7n);
    c.destroy();
    control(server);
  });

  test("an export name that is too long is refused", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet();
    const name = new Uint8Array(5000).fill(0x61);
    c.option(OPT.GO, concat(u32(name.length), name, u16(0)));
    assert.equal((await c.optionReply())?.type, 0x80000003); // ERR_INVALID
    c.option(OPT.EXPORT_NAME, name);
    assert.equal(await c.closedWithin(5000), true);
    control(server);
  });

  test("a NUL in an export name or a meta context query, or a query over 4096 bytes, is refused (as nbdkit)", async () => {
    const nul = new Uint8Array([0x61, 0, 0x62]);
    const c = await RawClient.connect(server.socket);
    await c.greet();
    c.option(OPT.GO, concat(u32(nul.length), nul, u16(0)));
    assert.equal((await c.optionReply())?.type, 0x80000003); // ERR_INVALID
    c.option(OPT.STRUCTURED_REPLY);
    assert.equal((await c.optionReply())?.type, 1);
    const query = (q: Uint8Array) => concat(u32(0), u32(1), u32(q.length), q);
    c.option(
      OPT.SET_META_CONTEXT,
      query(new Uint8Array([...new TextEncoder().encode("base:"), 0])),
    );
    assert.equal((await c.optionReply())?.type, 0x80000003);
    c.option(OPT.SET_META_CONTEXT, query(new Uint8Array(4097).fill(0x61)));
    assert.equal((await c.optionReply())?.type, 0x80000003);
    // The refusals leave the handshake usable: base:allocation can still be chosen.
    c.option(OPT.SET_META_CONTEXT, query(new TextEncoder().encode("base:allocation")));
    assert.equal((await c.optionReply())?.type, 4); // NBD_REP_META_CONTEXT
    assert.equal((await c.optionReply())?.type, 1);
    c.option(OPT.EXPORT_NAME, nul);
    assert.equal(await c.closedWithin(5000), true);
    assert.match(
      await server.waitForStderr(/NBD_OPT_EXPORT_NAME: export name may not include NUL bytes\n/),
      /error: NBD_OPT_EXPORT_NAME: export name may not include NUL bytes\n/,
    );
    control(server);
  });

  test("a refused SET_META_CONTEXT drops the context set before it, as the spec says", async () => {
    const c = await RawClient.connect(server.socket);
    await c.greet();
    c.option(OPT.STRUCTURED_REPLY);
    assert.equal((await c.optionReply())?.type, 1);
    const set = (q: Uint8Array) => concat(u32(0), u32(1), u32(q.length), q);
    const base = new TextEncoder().encode("base:allocation");
    c.option(OPT.SET_META_CONTEXT, set(base));
    assert.equal((await c.optionReply())?.type, 4); // NBD_REP_META_CONTEXT
    assert.equal((await c.optionReply())?.type, 1);
    c.option(OPT.SET_META_CONTEXT, set(concat(base, new Uint8Array([0]))));
    assert.equal((await c.optionReply())?.type, 0x80000003); // ERR_INVALID
    await c.sendGo();
    // No context is left, so BLOCK_STATUS is refused: an error chunk with EINVAL.
    c.request(CMD.STATUS, 0n, 4096, { cookie: 9n });
    const header = await c.read(20);
    assert.ok(header, "a reply to BLOCK_STATUS");
    const v = new DataView(header.buffer, header.byteOffset, 20);
    assert.equal(v.getUint32(0), 0x668e33ef); // structured reply magic
    assert.equal(v.getUint16(6), 0x8001); // NBD_REPLY_TYPE_ERROR
    assert.equal(v.getBigUint64(8), 9n);
    const payload = await c.read(v.getUint32(16));
    assert.equal(new DataView(payload!.buffer, payload!.byteOffset).getUint32(0), EINVAL);
    c.destroy();
    control(server);
  });

  test("a request with bad magic ends that connection only", async () => {
    const c = await RawClient.connect(server.socket);
    await c.go();
    c.request(CMD.READ, 0n, 512, { magic: 0x12345678 });
    assert.equal(await c.closedWithin(5000), true);
    assert.match(
      await server.waitForStderr(/error: invalid request: bad magic 0x12345678\n/),
      /error: invalid request: bad magic 0x12345678\n/,
    );
    control(server);
  });

  test("READ past the end or of no bytes gets EINVAL, WRITE ENOSPC (as nbdkit), and the connection stays", async () => {
    const c = await RawClient.connect(server.socket);
    const { size } = await c.go();
    assert.equal(size, BigInt(SIZE));
    c.request(CMD.READ, BigInt(SIZE - 256), 512, { cookie: 1n });
    assert.equal((await c.simpleReply())?.error, EINVAL);
    c.request(CMD.WRITE, BigInt(SIZE), 4, { cookie: 2n, payload: new Uint8Array(4) });
    assert.equal((await c.simpleReply())?.error, ENOSPC);
    c.request(CMD.READ, 0xffffffffffff0000n, 512, { cookie: 3n });
    assert.equal((await c.simpleReply())?.error, EINVAL);
    // A zero length is out of range too.
    c.request(CMD.WRITE, 0n, 0, { cookie: 5n });
    assert.equal((await c.simpleReply())?.error, ENOSPC);
    c.request(CMD.ZERO, 0n, 0, { cookie: 6n });
    assert.equal((await c.simpleReply())?.error, ENOSPC);
    c.request(CMD.READ, 0n, 0, { cookie: 7n });
    assert.equal((await c.simpleReply())?.error, EINVAL);
    c.request(CMD.READ, 0n, 512, { cookie: 4n });
    const ok = await c.simpleReply(512);
    assert.equal(ok?.error, 0);
    assert.equal(ok?.cookie, 4n);
    assert.match(
      await server.waitForStderr(
        /error: invalid request: NBD_CMD_READ: offset 8388352 \+ count 512 > size 8388608/,
      ),
      /error: invalid request: NBD_CMD_READ: offset 8388352 \+ count 512 > size 8388608/,
    );
    c.destroy();
    control(server);
  });

  test("a request over the maximum size is refused, its payload skipped", async () => {
    // Larger than the limit, so that the request is in range: out of range comes first, as in nbdkit.
    const large = await startTestServer(["memory", "size=1G"]);
    const c = await RawClient.connect(large.socket);
    await c.go();
    c.request(CMD.READ, 0n, 65 * 1024 * 1024, { cookie: 1n });
    assert.equal((await c.simpleReply())?.error, ENOMEM);
    const big = 65 * 1024 * 1024;
    c.request(CMD.WRITE, 0n, big, { cookie: 2n, payload: new Uint8Array(big).fill(0x55) });
    assert.equal((await c.simpleReply())?.error, ENOMEM);
    c.request(CMD.READ, 0n, 16, { cookie: 3n });
    const ok = await c.simpleReply(16);
    assert.equal(ok?.error, 0);
    assert.notDeepEqual([...ok!.data], new Array(16).fill(0x55)); // the refused payload was not written
    c.destroy();
    assert.equal(await large.stop(), 0);
  });

  test("a WRITE on a read-only export gets EPERM", async () => {
    const c = await RawClient.connect(ro.socket);
    const { flags } = await c.go();
    assert.ok(flags & 2, "read-only flag advertised");
    c.request(CMD.WRITE, 0n, 4, { cookie: 9n, payload: new Uint8Array(4) });
    const r = await c.simpleReply();
    assert.equal(r?.error, EPERM);
    assert.equal(r?.cookie, 9n);
    c.request(CMD.ZERO, 0n, 4, { cookie: 10n });
    assert.equal((await c.simpleReply())?.error, EPERM);
    // Read-only comes first, as with nbdkit: FUA (not advertised here) does not make it EINVAL.
    c.request(CMD.WRITE, 0n, 4, { cookie: 11n, flags: 1, payload: new Uint8Array(4) });
    assert.equal((await c.simpleReply())?.error, EPERM);
    c.destroy();
    const read = nbdsh(ro.uri, "print(h.pread(4, 0) == bytes(4))");
    assert.equal(read.stdout.trim(), "True");
  });

  test("FUA on commands that do not write is accepted, as the spec requires", () => {
    // nbdsh refuses such flags unless strict mode is relaxed: clients that
    // set them anyway exist, and a server that advertised FUA must accept them.
    const r = nbdsh(
      server.uri,
      [
        "c = nbd.NBD()",
        "c.add_meta_context('base:allocation')",
        "c.set_strict_mode(0)",
        `c.connect_uri(${JSON.stringify(server.uri)})`,
        "c.pwrite(b'\\x5a' * 512, 0)",
        "assert c.pread(512, 0, nbd.CMD_FLAG_FUA) == b'\\x5a' * 512",
        "c.flush(nbd.CMD_FLAG_FUA)",
        "seen = []",
        "c.block_status(512, 0, lambda ctx, off, ents, err: seen.append(ents), nbd.CMD_FLAG_FUA)",
        "assert seen and seen[0][0] >= 512, seen",
        "print('ok')",
      ].join("\n"),
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "ok");
  });

  test("a client that disconnects in the middle of a WRITE payload changes nothing", async () => {
    const before = nbdsh(server.uri, "print(h.pread(16, 4*1024*1024).hex())").stdout.trim();
    const c = await RawClient.connect(server.socket);
    await c.go();
    c.request(CMD.WRITE, 4n * 1024n * 1024n, 1024 * 1024, {
      payload: new Uint8Array(1000).fill(0xee),
    });
    await new Promise((r) => setTimeout(r, 200));
    c.destroy();
    await new Promise((r) => setTimeout(r, 200));
    const now = nbdsh(server.uri, "print(h.pread(16, 4*1024*1024).hex())").stdout.trim();
    assert.equal(now, before);
    control(server);
  });

  test("every error line is one line with the plugin's prefix", () => {
    for (const line of server.stderr().split("\n").filter((l) => l !== "")) {
      assert.match(line, /^nbdkit-ts: memory\[\d+\]: error: \S/);
    }
  });
});

const MiB = 1024 * 1024;
/** Offsets and counts: valid, empty, across the end, too large, far out, wrapping past 2^64. */
const RANGES: [bigint, number][] = [
  [0n, 4096],
  [0n, 0],
  [BigInt(MiB - 512), 1024],
  [0n, 64 * MiB + 1],
  [1n << 60n, 4096],
  [(1n << 64n) - 4096n, 8192],
];
/** READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, and an unknown command. */
const TYPES = [0, 1, 3, 4, 5, 6, 7, 9];
/** None, FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, and an unknown flag. */
const FLAGS = [0, 1, 2, 4, 8, 16, 0x100];

/** The errno of every request of the matrix, one at a time on one connection. */
async function errnos(socket: string): Promise<string[]> {
  const c = await RawClient.connect(socket);
  await c.go();
  const out: string[] = [];
  let cookie = 1n;
  for (const type of TYPES) {
    for (const flags of FLAGS) {
      for (const [offset, count] of RANGES) {
        // A 64 MiB payload for every flag would make this slow; one is enough.
        if (type === 1 && count > 64 * MiB && flags !== 0) continue;
        const payload = type === 1 ? new Uint8Array(count) : undefined;
        c.request(type, offset, count, { flags, cookie, payload });
        const r = await c.simpleReply(type === 0 ? count : 0);
        assert.equal(
          r?.cookie,
          cookie,
          `type ${type} flags ${flags} offset ${offset} count ${count}`,
        );
        out.push(`type ${type} flags 0x${flags.toString(16)} @${offset}+${count}: ${r?.error}`);
        cookie++;
      }
    }
  }
  c.destroy();
  return out;
}

test("requests with one fault or several get the errno nbdkit gives them", async () => {
  requireTool("nbdkit");
  for (const readonly of [false, true]) {
    const ours = await startTestServer([...(readonly ? ["-r"] : []), "memory", `size=${MiB}`]);
    const peer = await startTestServer([...(readonly ? ["-r"] : []), "memory", `${MiB}`], {}, [
      "nbdkit",
    ]);
    try {
      const [mine, theirs] = [await errnos(ours.socket), await errnos(peer.socket)];
      assert.ok(mine.length > 300);
      assert.deepEqual(mine, theirs, readonly ? "read-only" : "read-write");
    } finally {
      assert.equal(await ours.stop(), 0);
      assert.equal(await peer.stop(), 0);
    }
  }
});

test("an offset in range but past 2^53 gets EINVAL, whatever the command", async () => {
  const ours = await startTestServer(["null", "size=9223372036854775807"]);
  try {
    const c = await RawClient.connect(ours.socket);
    await c.go();
    for (
      const [type, payload] of [[0, undefined], [1, new Uint8Array(512)], [6, undefined]] as const
    ) {
      c.request(type, 1n << 60n, 512, { cookie: 1n, payload });
      assert.equal((await c.simpleReply())?.error, EINVAL, `type ${type}`);
    }
    c.request(CMD.READ, (1n << 53n) - 1024n, 512, { cookie: 2n });
    assert.equal((await c.simpleReply(512))?.error, 0);
    c.destroy();
  } finally {
    assert.equal(await ours.stop(), 0);
  }
});
