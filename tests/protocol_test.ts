/**
 * Unit tests of the pure parts: sizes, the command line parser, the byte
 * reader, and the protocol phases over in-memory streams (no sockets).
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { parseSize } from "../plugins/size.ts";
import { parseCli, UsageError } from "../server/cli_args.ts";
import { ByteReader, EndOfStream } from "../protocol/byte_reader.ts";
import { handshake } from "../protocol/handshake.ts";
import { transmission } from "../protocol/transmission.ts";
import { pluginProvider } from "../server/backend.ts";
import { definePlugin, type Plugin } from "../plugins/plugin.ts";
import { NbdError } from "../plugins/errors.ts";
import { concat, u16, u32, u64 } from "./raw_client.ts";

describe("parseSize", () => {
  test("accepts nbdkit's forms", () => {
    assert.equal(parseSize("0"), 0n);
    assert.equal(parseSize("512"), 512n);
    assert.equal(parseSize("1b"), 1n);
    assert.equal(parseSize("2s"), 1024n);
    assert.equal(parseSize("4k"), 4096n);
    assert.equal(parseSize("4K"), 4096n);
    assert.equal(parseSize("1M"), 1048576n);
    assert.equal(parseSize("1G"), 1073741824n);
    assert.equal(parseSize("1e"), 1n << 60n);
    assert.equal(parseSize(" 5"), 5n);
  });
  test("refuses what nbdkit refuses, with its words", () => {
    assert.throws(() => parseSize("1KB"), /unknown suffix 'KB'/);
    assert.throws(() => parseSize("1.5G"), /unknown suffix '.5G'/);
    assert.throws(() => parseSize("-1"), /cannot be negative/);
    assert.throws(() => parseSize("8E"), /overflow/);
    assert.throws(() => parseSize("x"), /could not parse size/);
  });
});

describe("parseCli", () => {
  test("options anywhere, bundled short flags, magic values", () => {
    const a = parseCli(["-fr", "-U", "-", "memory", "1G", "--run", "cmd", "-t8", "x=y=z"]);
    assert.equal(a.foreground, true);
    assert.equal(a.readonly, true);
    assert.equal(a.unixSocket, "-");
    assert.equal(a.plugin, "memory");
    assert.equal(a.threads, 8);
    assert.equal(a.run, "cmd");
    assert.deepEqual(a.params, [{ key: null, value: "1G" }, { key: "x", value: "y=z" }]);
  });
  test("a path with '=' before a slash is a bare value", () => {
    const a = parseCli(["file", "/tmp/a=b/disk.img"]);
    assert.deepEqual(a.params, [{ key: null, value: "/tmp/a=b/disk.img" }]);
  });
  test("errors", () => {
    assert.throws(() => parseCli(["--nope"]), UsageError);
    assert.throws(() => parseCli(["-p"]), /requires an argument/);
    assert.throws(() => parseCli(["--tls=maybe"]), /off, on or require/);
    assert.throws(() => parseCli(["-t", "1025"]), /out of range/);
    assert.equal(parseCli(["-t", "0"]).threads, 16); // nbdkit's -t 0: the default
  });
  test("every spelling of nbdkit(1)'s options means what its short form does", () => {
    // From nbdkit(1)'s OPTIONS, the options this server has, as "short long…".
    const spellings = [
      ["-e x", "--export=x", "--export-name=x", "--exportname=x"],
      ["-f", "--foreground", "--no-fork"],
      ["-i 127.0.0.1", "--ip-addr=127.0.0.1", "--ipaddr=127.0.0.1"],
      ["-4", "--ipv4-only"],
      ["-6", "--ipv6-only"],
      ["-n", "--new-style", "--newstyle"],
      ["-P p", "--pid-file=p", "--pidfile=p"],
      ["-p 1", "--port=1"],
      ["-r", "--read-only", "--readonly"],
      ["-s", "--single", "--stdin"],
      ["-t 3", "--threads=3"],
      ["-U s", "--unix=s"],
      ["-v", "--verbose"],
      ["-D a.b=1", "--debug=a.b=1"],
    ];
    for (const [short, ...long] of spellings) {
      const expected = parseCli([...short.split(" "), "null"]);
      for (const spelling of long) {
        assert.deepEqual(parseCli([spelling, "null"]), expected, spelling);
      }
    }
    for (const refused of ["-o", "--old-style", "--oldstyle"]) {
      assert.throws(() => parseCli([refused, "null"]), /oldstyle protocol is not supported/);
    }
  });
});

describe("ByteReader", () => {
  test("reads across chunks, skips, and reports a short stream", async () => {
    const r = new ByteReader(
      ReadableStream.from([new Uint8Array([1, 2, 3]), new Uint8Array([4]), new Uint8Array([5, 6])]),
    );
    assert.deepEqual([...await r.read(2)], [1, 2]);
    assert.deepEqual([...await r.read(3)], [3, 4, 5]);
    await assert.rejects(r.read(2), (e) => e instanceof EndOfStream && e.partial);
  });
});

/** A client and a server joined by in-memory streams. */
function pipePair() {
  const toServer = new TransformStream<Uint8Array, Uint8Array>();
  const toClient = new TransformStream<Uint8Array, Uint8Array>();
  return {
    server: { reader: new ByteReader(toServer.readable), writer: toClient.writable.getWriter() },
    client: { reader: new ByteReader(toClient.readable), writer: toServer.writable.getWriter() },
  };
}

const IHAVEOPT = 0x49484156454f5054n;

/**
 * Serve `plugin` over in-memory streams: the server side runs in the
 * background (`serving` settles when the client disconnects); the test
 * drives `client` byte by byte.
 */
function serveOnPipes(
  plugin: Plugin<unknown>,
  options: { structured: boolean; readonly: boolean; errors: string[]; maxInFlight?: number },
) {
  const { server, client } = pipePair();
  const serving = (async () => {
    const n = await handshake(
      server.reader,
      server.writer,
      pluginProvider(plugin, { readonly: options.readonly, exportName: "" }, 1),
      {
        structuredReplies: options.structured,
        metaContexts: options.structured,
        handshakeFlags: 3,
        debug: () => {},
        error: (m) => options.errors.push(m),
      },
    );
    assert.ok(n);
    assert.equal(n.structured, options.structured);
    await transmission(n.reader, n.writer, n.session, {
      structured: options.structured,
      baseAllocation: false,
      maxInFlight: options.maxInFlight ?? 16,
      error: (m) => options.errors.push(m),
      debug: () => {},
      shuttingDown: () => false,
    });
    await n.session.close();
  })();
  return { client, serving };
}

/** Read the replies to NBD_OPT_GO up to its ACK. */
async function readGoReplies(client: ReturnType<typeof pipePair>["client"]): Promise<void> {
  for (;;) {
    const h = await client.reader.read(20);
    const v = new DataView(h.buffer, h.byteOffset);
    const len = v.getUint32(16);
    if (len) await client.reader.read(len);
    if (v.getUint32(12) === 1) return;
  }
}

describe("protocol over in-memory streams", () => {
  test("GO with structured replies, then replies out of order", async () => {
    const disk = new Uint8Array(1 << 20);
    const plugin = definePlugin({
      name: "slowfirst",
      open: () => disk,
      getSize: (d) => d.length,
      async pread(d, buf, offset) {
        // The request at offset 0 is slow: its reply must come after a later one.
        if (offset === 0) await new Promise((r) => setTimeout(r, 50));
        buf.set(d.subarray(offset, offset + buf.length));
      },
      pwrite(d, buf, offset) {
        if (offset === 4096) throw new NbdError("ENOSPC", "no room at 4096");
        d.set(buf, offset);
      },
    });
    const errors: string[] = [];
    const { client, serving } = serveOnPipes(plugin, { structured: true, readonly: false, errors });

    const greeting = await client.reader.read(18);
    assert.equal(new DataView(greeting.buffer, greeting.byteOffset).getUint16(16), 3);
    await client.writer.write(u32(3));
    await client.writer.write(concat(u64(IHAVEOPT), u32(8), u32(0)));
    const sr = await client.reader.read(20);
    assert.equal(new DataView(sr.buffer, sr.byteOffset).getUint32(12), 1); // ACK
    await client.writer.write(concat(u64(IHAVEOPT), u32(7), u32(6), u32(0), u16(0)));
    await readGoReplies(client);
    const req = (type: number, cookie: number, offset: number, count: number, data?: Uint8Array) =>
      concat(
        u32(0x25609513),
        u16(0),
        u16(type),
        u64(BigInt(cookie)),
        u64(BigInt(offset)),
        u32(count),
        data ?? new Uint8Array(0),
      );
    await client.writer.write(req(1, 1, 8192, 4, new Uint8Array([9, 8, 7, 6])));
    const w = await client.reader.read(16);
    assert.equal(new DataView(w.buffer, w.byteOffset).getUint32(4), 0);
    // Two reads in flight: the slow one first.
    await client.writer.write(concat(req(0, 10, 0, 4), req(0, 11, 8192, 4)));
    const cookies: number[] = [];
    for (let i = 0; i < 2; i++) {
      const h = await client.reader.read(20);
      const v = new DataView(h.buffer, h.byteOffset);
      assert.equal(v.getUint32(0), 0x668e33ef);
      assert.equal(v.getUint16(6), 1); // OFFSET_DATA
      const cookie = Number(v.getBigUint64(8));
      cookies.push(cookie);
      const body = await client.reader.read(v.getUint32(16));
      if (cookie === 11) assert.deepEqual([...body.subarray(8)], [9, 8, 7, 6]);
    }
    assert.deepEqual(cookies, [11, 10]);
    // A plugin error reaches the client as its errno, simple reply for writes.
    await client.writer.write(req(1, 12, 4096, 1, new Uint8Array([1])));
    const e = await client.reader.read(16);
    assert.equal(new DataView(e.buffer, e.byteOffset).getUint32(4), 28); // ENOSPC
    await client.writer.write(req(2, 13, 0, 0)); // DISC
    await serving;
    assert.deepEqual(errors, ["NBD_CMD_WRITE: no room at 4096"]);
  });

  test("a reused read buffer is zeroed unless the plugin promises to fill it", async () => {
    // 96 KiB: a reply size no other test uses, so the pooled buffer is this test's.
    const count = 96 * 1024;
    for (const fills of [false, true]) {
      const zeroedOnEntry: boolean[] = [];
      const plugin = definePlugin({
        name: "firstonly",
        preadFillsBuffer: fills,
        open: () => null,
        getSize: () => 1 << 20,
        pread(_h, buf, offset) {
          zeroedOnEntry.push(buf.every((b) => b === 0));
          if (offset === 0) buf.fill(0xaa); // later reads leave the buffer as it came
        },
      });
      const { client, serving } = serveOnPipes(plugin, {
        structured: false,
        readonly: true,
        errors: [],
      });
      await client.reader.read(18);
      await client.writer.write(u32(3));
      await client.writer.write(concat(u64(IHAVEOPT), u32(7), u32(6), u32(0), u16(0)));
      await readGoReplies(client);
      const read = async (cookie: number, offset: number) => {
        await client.writer.write(
          concat(
            u32(0x25609513),
            u16(0),
            u16(0),
            u64(BigInt(cookie)),
            u64(BigInt(offset)),
            u32(count),
          ),
        );
        const h = await client.reader.read(16);
        assert.equal(new DataView(h.buffer, h.byteOffset).getUint32(4), 0);
        return (await client.reader.read(count)).slice();
      };
      assert.ok((await read(1, 0)).every((b) => b === 0xaa));
      const second = await read(2, 65536);
      await client.writer.write(concat(u32(0x25609513), u16(0), u16(2), u64(3n), u64(0n), u32(0)));
      await serving;
      // The second read got the first one's buffer back from the pool.
      assert.deepEqual(zeroedOnEntry, [true, !fills]);
      assert.ok(second.every((b) => b === (fills ? 0xaa : 0)));
    }
  });

  test("replies just under 64 KiB, batched together, each keep their own bytes", async () => {
    // 28 + 65504 bytes: a reply batched with the next one, in a buffer of 32 + 65504
    // bytes. Handed back to the pool before the batch went out, the buffer was
    // taken by the second read (one request at a time: it starts once the first
    // is done) and the first reply carried the second's bytes.
    const count = 65504;
    const plugin = definePlugin({
      name: "byoffset",
      preadFillsBuffer: true,
      open: () => null,
      getSize: () => 1 << 20,
      pread: (_h, buf, offset) => void buf.fill(offset === 0 ? 0xaa : 0xbb),
    });
    const { client, serving } = serveOnPipes(plugin, {
      structured: true,
      readonly: true,
      errors: [],
      maxInFlight: 1,
    });
    await client.reader.read(18);
    await client.writer.write(u32(3));
    await client.writer.write(concat(u64(IHAVEOPT), u32(8), u32(0)));
    await client.reader.read(20);
    await client.writer.write(concat(u64(IHAVEOPT), u32(7), u32(6), u32(0), u16(0)));
    await readGoReplies(client);
    const read = (cookie: number, offset: number) =>
      concat(u32(0x25609513), u16(0), u16(0), u64(BigInt(cookie)), u64(BigInt(offset)), u32(count));
    await client.writer.write(concat(read(1, 0), read(2, 1 << 19)));
    const got = new Map<number, Uint8Array>();
    for (let i = 0; i < 2; i++) {
      const h = await client.reader.read(20);
      const v = new DataView(h.buffer, h.byteOffset);
      const body = (await client.reader.read(v.getUint32(16))).slice(8);
      got.set(Number(v.getBigUint64(8)), body);
    }
    await client.writer.write(concat(u32(0x25609513), u16(0), u16(2), u64(3n), u64(0n), u32(0)));
    await serving;
    assert.ok(got.get(1)!.every((b) => b === 0xaa), "the first reply has the first read's bytes");
    assert.ok(got.get(2)!.every((b) => b === 0xbb));
  });
});
