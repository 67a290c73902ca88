/**
 * `null size=SIZE`: a disk that discards writes and reads as zeroes.
 *
 * Useful as a copy target (`nbdcopy … nbd+unix://…`) and for measuring the
 * server alone.
 *
 * @module
 */
import { EXTENT_HOLE, EXTENT_ZERO, type Plugin } from "./plugin.ts";
import { parseSize } from "./size.ts";
import { VERSION } from "../version.ts";

/**
 * Create a null plugin.
 *
 * @returns A fresh, unconfigured plugin.
 */
export function createNullPlugin(): Plugin<null> {
  let size = 0n;
  return {
    name: "null",
    longname: "nbdkit-ts null plugin",
    version: VERSION,
    magicConfigKey: "size",
    configHelp: "size=<SIZE>  Size of the disk (default 0).",
    threadModel: "parallel",
    preadFillsBuffer: true,

    config(key, value) {
      if (key !== "size") throw new Error(`unknown parameter '${key}'`);
      size = parseSize(value);
    },

    open: () => null,
    getSize: () => size,
    canMultiConn: () => true,
    canFua: () => "native",
    canCache: () => "native",
    canFastZero: () => true,

    pread(_h, buf) {
      buf.fill(0);
    },
    pwrite() {},
    flush() {},
    trim() {},
    zero() {},
    cache() {},
    extents(_h, count, offset, _flags, sink) {
      sink.add(offset, count, EXTENT_HOLE | EXTENT_ZERO);
    },
  };
}

/** The null plugin, as `nbdkit-ts null` loads it. */
export default createNullPlugin();
