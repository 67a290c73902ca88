/**
 * Example plugin: copy-on-write over another plugin. Reads come from the
 * plugin underneath until a block is written; written blocks live in memory,
 * shared by every connection, and are gone when the server stops. The
 * plugin underneath is opened read-only and never written.
 *
 * On the command line it wraps the file plugin, to scribble on a disk image without changing it:
 * ```sh
 * nbdkit-ts -U - ./plugins/examples/cow.ts disk.img --run 'qemu-io -f raw -c "write 0 1M" "$uri"'
 * ```
 *
 * In a program, {@linkcode createCowPlugin} wraps any plugin:
 * `serve(createCowPlugin(createMemoryPlugin()), { config: { size: "1G" } })`.
 *
 * @module
 */
import { createFilePlugin, definePlugin, NbdError, type Plugin } from "../../mod.ts";

/** The overlay's unit: a write copies the rest of its first and last blocks from below. */
const BLOCK = 4096;

/**
 * Wrap `base` in a copy-on-write overlay. Parameters go to `base`.
 *
 * @param base The plugin underneath (configured through the overlay).
 * @returns A writable plugin named `cow`.
 */
export function createCowPlugin<H>(base: Plugin<H>): Plugin<{ h: H; size: number }> {
  const overlay = new Map<number, Uint8Array>(); // block index → its bytes
  return definePlugin({
    name: "cow",
    longname: `copy-on-write over the ${base.name} plugin`,
    configHelp: base.configHelp,
    magicConfigKey: base.magicConfigKey,
    threadModel: base.threadModel,

    config(key, value) {
      if (!base.config) throw new Error(`unknown parameter '${key}'`);
      return base.config(key, value);
    },
    configComplete: () => base.configComplete?.(),
    getReady: () => base.getReady?.(),
    unload: () => base.unload?.(),

    async open(ctx) {
      const h = await base.open({ ...ctx, readonly: true });
      const size = Number(await base.getSize(h));
      if (!Number.isSafeInteger(size)) throw new NbdError("EOVERFLOW", "the disk is too large");
      return { h, size };
    },
    close: ({ h }) => base.close?.(h),
    getSize: ({ size }) => size,
    // The overlay is global: every connection sees every write.
    canMultiConn: () => true,

    async pread({ h }, buf, offset) {
      for (let done = 0, n = 0; done < buf.length; done += n) {
        const at = offset + done;
        const end = offset + buf.length;
        const block = overlay.get(Math.floor(at / BLOCK));
        if (block) {
          n = Math.min(BLOCK - (at % BLOCK), end - at);
          buf.set(block.subarray(at % BLOCK, at % BLOCK + n), done);
        } else {
          // Read the whole run of unwritten blocks from below in one call.
          let stop = (Math.floor(at / BLOCK) + 1) * BLOCK;
          while (stop < end && !overlay.has(stop / BLOCK)) stop += BLOCK;
          n = Math.min(stop, end) - at;
          const part = buf.subarray(done, done + n);
          // The plugin below may lend its own bytes rather than fill the buffer.
          const lent = await base.pread(h, part, at);
          if (lent) {
            part.set(lent.bytes);
            lent.release?.();
          }
        }
      }
    },

    async pwrite({ h, size }, buf, offset) {
      for (let done = 0, n = 0; done < buf.length; done += n) {
        const at = offset + done;
        const index = Math.floor(at / BLOCK);
        n = Math.min(BLOCK - (at % BLOCK), buf.length - done);
        let block = overlay.get(index);
        if (!block) {
          const start = index * BLOCK;
          const copy = new Uint8Array(BLOCK);
          // A partial block keeps the bytes below it (the last block may be short).
          if (n < BLOCK) {
            await base.pread(h, copy.subarray(0, Math.min(BLOCK, size - start)), start);
          }
          // Another write may have copied the block while this one read it.
          block = overlay.get(index) ?? copy;
          overlay.set(index, block);
        }
        block.set(buf.subarray(done, done + n), at % BLOCK);
      }
    },
  });
}

/** Copy-on-write over a file: `nbdkit-ts ./plugins/examples/cow.ts FILE`. */
export default createCowPlugin(createFilePlugin());
