/**
 * Example plugin: a read-only disk whose every 8-byte word holds its own
 * offset, big-endian (the layout of nbdkit-pattern-plugin). Handy to check
 * that a client reads the bytes it asked for.
 *
 * ```sh
 * nbdkit-ts -U - ./plugins/examples/pattern.ts size=1M \
 *   --run 'nbdsh -u "$uri" -c "print(h.pread(8, 4096).hex())"'    # 0000000000001000
 * ```
 *
 * Parameters: `size=SIZE` (required; nbdkit's suffixes: `1M`, `8G`, …).
 *
 * It has no `pwrite`, so clients see a read-only export, and no `extents`,
 * so it is all data: the server fills in the rest.
 *
 * @module
 */
import { definePlugin, parseSize } from "../../mod.ts";

let size = -1n;

/** The pattern plugin, as `nbdkit-ts ./plugins/examples/pattern.ts size=…` loads it. */
export default definePlugin({
  name: "pattern",
  longname: "nbdkit-ts example: offsets as big-endian 64-bit words",
  configHelp: "size=<SIZE>  (required) Size of the disk, e.g. 1G.",
  magicConfigKey: "size",

  config(key, value) {
    if (key !== "size") throw new Error(`unknown parameter '${key}'`);
    size = parseSize(value);
  },

  configComplete() {
    if (size < 0n) throw new Error("you must specify size=<SIZE> on the command line");
  },

  // Nothing per connection: the handle is null.
  open: () => null,
  getSize: () => size,
  // Every connection sees the same bytes.
  canMultiConn: () => true,

  pread(_h, buf, offset) {
    const word = new DataView(new ArrayBuffer(8));
    const bytes = new Uint8Array(word.buffer);
    for (let done = 0; done < buf.length;) {
      const at = offset + done;
      const start = at - (at % 8); // the word holding `at`
      // Offsets reach 2^53: write the high and low halves, not a 32-bit `|`.
      word.setUint32(0, Math.floor(start / 2 ** 32));
      word.setUint32(4, start % 2 ** 32);
      const n = Math.min(8 - (at - start), buf.length - done);
      buf.set(bytes.subarray(at - start, at - start + n), done);
      done += n;
    }
  },
});
