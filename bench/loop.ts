/**
 * The request loop's own cost, with no sockets and no other process: N
 * requests of 4 KiB (writes, or reads with `--read`) through the memory
 * plugin, fed from memory to `transmission()`, replies discarded. Prints
 * microseconds per request. Repeatable where the machine's noise swamps fio's
 * figures, so it is the A/B for changes to the hot path:
 *
 * ```
 * deno run -A bench/loop.ts [--read] [--root=OTHER_CHECKOUT]
 * ```
 *
 * `--root` runs another checkout's code (a `git worktree` of the commit
 * before a change), in the same run.
 *
 * @module
 */
import process from "node:process";
import { resolve } from "node:path";

const argv = process.argv.slice(2);
const rootArg = argv.find((a) => a.startsWith("--root="))?.slice(7);
const root = resolve(rootArg ?? new URL("..", import.meta.url).pathname);
const kind = argv.includes("--read") ? "read" : "write";
const { ByteReader } = await import(`${root}/protocol/byte_reader.ts`);
const { transmission } = await import(`${root}/protocol/transmission.ts`);
const { pluginProvider } = await import(`${root}/server/backend.ts`);
const { createMemoryPlugin } = await import(`${root}/plugins/memory.ts`);
const plugin = createMemoryPlugin();
await plugin.config!("size", "1G");
await plugin.configComplete?.();
const provider = pluginProvider(plugin, { readonly: false, exportName: "" }, 1);
const session = await provider.open("", false);
// A 64 KiB socket read carries about 15 requests of 4 KiB writes: chunks as the socket would give them.
const N = 200_000, BS = 4096, PER_CHUNK = 15;
const reqLen = 28 + (kind === "write" ? BS : 0);
const one = new Uint8Array(reqLen * PER_CHUNK);
const dv = new DataView(one.buffer);
let seed = 1;
/** Fill `one` with the next requests, at pseudo-random 4 KiB-aligned offsets (the same every run). */
function fillChunk() {
  for (let i = 0; i < PER_CHUNK; i++) {
    const at = i * reqLen;
    dv.setUint32(at, 0x25609513);
    dv.setUint16(at + 4, 0);
    dv.setUint16(at + 6, kind === "write" ? 1 : 0);
    dv.setBigUint64(at + 8, BigInt(i));
    seed = (seed * 1103515245 + 12345) >>> 0;
    const off = (seed % 262144) * 4096;
    dv.setUint32(at + 16, Math.floor(off / 2 ** 32));
    dv.setUint32(at + 20, off >>> 0);
    dv.setUint32(at + 24, BS);
  }
}
let sent = 0;
const stream = new ReadableStream<Uint8Array>({
  pull(c) {
    if (sent >= N) {
      c.close();
      return;
    }
    fillChunk();
    c.enqueue(one.slice());
    sent += PER_CHUNK;
  },
});
// Replies are counted and dropped: the write resolves at once, as a socket with room would.
let bytesOut = 0;
const sink = new WritableStream<Uint8Array>({
  write(b) {
    bytesOut += b.length;
  },
});
const t0 = performance.now();
await transmission(new ByteReader(stream), sink.getWriter(), session, {
  structured: false,
  baseAllocation: false,
  maxInFlight: 16,
  error: (m: string) => console.error(m),
  debug: () => {},
  shuttingDown: () => false,
});
const t = performance.now() - t0;
console.log(
  `${root}: ${kind}: ${
    (t * 1000 / sent).toFixed(2)
  } us per request (${sent} requests, ${bytesOut} bytes out)`,
);
