/**
 * `file FILE` (or `file=FILE`): serve a file or block device.
 *
 * The file is opened once per connection, read-write unless the server is
 * read-only. Its size is read at each connection, so a file that grew is
 * seen at the next connection.
 *
 * @module
 */
import { NbdError } from "./errors.ts";
import type { Plugin } from "./plugin.ts";
import { runtime } from "../runtime/mod.ts";
import type { RandomAccessFile } from "../runtime/types.ts";
import { VERSION } from "../version.ts";

interface Handle {
  file: RandomAccessFile;
  size: number;
}

/**
 * Create a file plugin.
 *
 * @returns A fresh, unconfigured plugin.
 */
export function createFilePlugin(): Plugin<Handle> {
  let path: string | undefined;
  return {
    name: "file",
    longname: "nbdkit-ts file plugin",
    version: VERSION,
    magicConfigKey: "file",
    configHelp: "[file=]<FILENAME>  (required) The filename to serve.",
    threadModel: "parallel",
    preadFillsBuffer: true,

    config(key, value) {
      if (key !== "file") throw new Error(`unknown parameter '${key}'`);
      path = runtime.resolvePath(value);
    },

    async configComplete() {
      if (path === undefined) throw new Error("you must supply the file=<FILENAME> parameter");
      const info = await runtime.stat(path);
      if (info === null) throw new Error(`${path}: No such file or directory`);
      if (info.kind !== "file" && info.kind !== "block") {
        throw new Error(`${path}: is not a regular file or block device`);
      }
    },

    async open({ readonly }) {
      let file: RandomAccessFile;
      try {
        file = await runtime.openFile(path!, { write: !readonly });
      } catch (err) {
        throw new NbdError("EIO", `open: ${path}: ${(err as Error).message}`);
      }
      return { file, size: await file.size() };
    },

    async close(h) {
      await h.file.close();
    },

    getSize: (h) => h.size,
    canMultiConn: () => true,
    canCache: () => "emulate",

    async pread(h, buf, offset) {
      await h.file.pread(buf, offset);
    },
    async pwrite(h, buf, offset, { fua }) {
      await h.file.pwrite(buf, offset);
      if (fua) await h.file.sync();
    },
    async flush(h) {
      await h.file.sync();
    },
    canFua: () => "native",
  };
}

/** The file plugin, as `nbdkit-ts file` loads it. */
export default createFilePlugin();
