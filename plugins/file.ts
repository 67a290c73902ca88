/**
 * `file FILE` (or `file=FILE`): serve a file or block device, as nbdkit's
 * file plugin does; `file dir=DIRECTORY`: serve the files of a directory,
 * each an export named by its file name.
 *
 * Parameters (`file=` or `dir=`, not both):
 * - `[file=]FILENAME`: the file or block device. The export name the client
 *   asks for is ignored.
 * - `dir=DIRECTORY`: every regular file and block device directly in
 *   DIRECTORY (symbolic links followed) is an export, listed by
 *   `NBD_OPT_LIST` in name order and read again at each listing, so files
 *   added later are served. The client must name one: the default export
 *   (`""`) and names with a `/` are refused, as in nbdkit.
 * - `cache=default|none`: with `none`, what was read is dropped from the
 *   page cache at once, and what was written eight writes later, once it is
 *   written back (`posix_fadvise(POSIX_FADV_DONTNEED)` drops clean pages
 *   only), so that a one-off copy does not evict everything else.
 * - `fadvise=normal|random|sequential`: the access pattern hint given to the
 *   kernel at open (read-ahead: normal, none, or doubled).
 *
 * The file is opened once per connection, read-write unless the server is
 * read-only; one that may only be read (EACCES, EPERM, EROFS) is served
 * read-only rather than refused. Its size is read at each connection, so a
 * file that grew is seen at the next connection.
 *
 * TRIM punches holes, WRITE_ZEROES punches a hole (when the client allows
 * trimming) or zeroes the range with `fallocate`, and extents come from
 * `SEEK_DATA`/`SEEK_HOLE`, so sparse files stay sparse. These need libc
 * through the runtime's FFI (Deno with `--allow-ffi`, Bun, Node with koffi);
 * without it TRIM is not offered, zeroes are written as data, everything is
 * reported as data, and `cache=` and `fadvise=` do nothing.
 *
 * @module
 */
import { type Errno, errnoOf, NbdError } from "./errors.ts";
import { EXTENT_HOLE, EXTENT_ZERO, type Plugin } from "./plugin.ts";
import { runtime } from "../runtime/mod.ts";
import { strerror } from "../runtime/errno.ts";
import type { FileKind, RandomAccessFile } from "../runtime/types.ts";
import { VERSION } from "../version.ts";

type CacheMode = "default" | "none";
type Fadvise = "normal" | "random" | "sequential";

/** With `cache=none`, a write's pages are dropped this many writes later, once written back. */
const EVICT_WINDOWS = 8;

interface Handle {
  file: RandomAccessFile;
  size: number;
  writable: boolean;
  extents: boolean;
  // Each fallocate mode is tried until the file system first says it cannot
  // (EOPNOTSUPP), as in nbdkit: a refusal is not worth asking again.
  canPunchHole: boolean;
  canZeroRange: boolean;
  canAllocate: boolean;
  // cache=none: the ranges of the last writes, oldest first.
  written: [offset: number, count: number][];
}

/** Why opening read-write fails for a file that can still be read. */
const READ_ONLY_CAUSES = new Set(["EACCES", "EPERM", "EROFS"]);

function codeOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

/**
 * NBD's errno for a runtime error: the server's mapping of system errors
 * (errnoOf), and EACCES as EPERM too: a file the server may not write.
 */
function fileErrno(err: unknown): Errno {
  return codeOf(err) === "EACCES" ? "EPERM" : errnoOf(err);
}

/** A runtime error as the NBD error the client gets, its message kept for the log. */
function nbdError(err: unknown, context?: string): NbdError {
  if (err instanceof NbdError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const errno = fileErrno(err);
  return new NbdError(errno, context ? `${context}: ${message}` : message, { cause: err });
}

/** How many entries of a directory a listing stats at once. */
const LIST_STATS = 64;

/**
 * A failure to open an export of a directory, for the client: the errno's
 * text, not the runtime's message with the server's path in it.
 */
function exportError(err: unknown): NbdError {
  if (err instanceof NbdError) return err;
  const code = codeOf(err);
  const reason = (code && strerror(code)) || "cannot open the file";
  return new NbdError(fileErrno(err), `open: ${reason}`, { cause: err });
}

/** Whether a file of this kind can be served: a regular file or a block device. */
function servable(kind: FileKind | undefined): boolean {
  return kind === "file" || kind === "block";
}

/**
 * The file of DIR an export name stands for, refused unless it is a regular
 * file or block device directly in DIR.
 */
async function fileInDir(dir: string, name: string): Promise<string> {
  // The client reads these messages: they never name the server's directory
  // (the server's log line names the export).
  if (name === "") {
    throw new NbdError(
      "EINVAL",
      "no export name: this server serves the files of a directory; ask for one by name (nbdinfo --list shows them)",
    );
  }
  if (name.includes("/")) throw new NbdError("EINVAL", "export name cannot contain '/'");
  const target = `${dir}/${name}`;
  const info = await runtime.stat(target).catch(() => null);
  if (info === null) throw new NbdError("EINVAL", "open: No such file or directory");
  if (!servable(info.kind)) {
    throw new NbdError("EINVAL", "open: not a regular file or block device");
  }
  return target;
}

/**
 * Create a file plugin.
 *
 * @returns A fresh, unconfigured plugin.
 *
 * @example Configured as `nbdkit-ts file disk.img fadvise=sequential cache=none` would be
 * ```ts
 * import { createFilePlugin } from "./file.ts";
 * const plugin = createFilePlugin();
 * await plugin.config!("file", "disk.img");
 * await plugin.config!("fadvise", "sequential");
 * await plugin.config!("cache", "none");
 * ```
 */
export function createFilePlugin(): Plugin<Handle> {
  let path: string | undefined;
  let dir: string | undefined;
  let cache: CacheMode = "default";
  let fadvise: Fadvise = "normal";

  async function sync(h: Handle): Promise<void> {
    try {
      await h.file.sync();
    } catch (err) {
      throw nbdError(err, "fdatasync");
    }
  }

  /** Try one fallocate mode: false when the file system cannot (and never will). */
  async function fallocate(
    h: Handle,
    mode: "punch-hole" | "zero-range" | "allocate",
    count: number,
    offset: number,
  ): Promise<boolean> {
    try {
      await h.file.fallocate!(mode, offset, count);
      return true;
    } catch (err) {
      const code = codeOf(err);
      if (code !== "EOPNOTSUPP" && code !== "ENOTSUP") throw nbdError(err, "zero");
      return false;
    }
  }

  /** cache=none: drop a write's pages from the page cache, without waiting for them. */
  async function evict(h: Handle, count: number, offset: number): Promise<void> {
    if (!h.file.advise) return;
    // DONTNEED starts writeback of dirty pages but drops only clean ones: the
    // range is asked again a few writes later, when it has been written.
    h.written.push([offset, count]);
    const old = h.written.length > EVICT_WINDOWS ? h.written.shift() : undefined;
    await h.file.advise(offset, count, "dontneed").catch(() => {});
    if (old) await h.file.advise(old[0], old[1], "dontneed").catch(() => {});
  }

  return {
    name: "file",
    longname: "nbdkit-ts file plugin",
    version: VERSION,
    magicConfigKey: "file",
    configHelp: "[file=]<FILENAME>     The filename to serve.\n" +
      "dir=<DIRNAME>         The directory whose files are served (one export each).\n" +
      "cache=<MODE>          Set use of caching (default, none).\n" +
      "fadvise=<LEVEL>       Set fadvise hint (normal, random, sequential).",
    threadModel: "parallel",
    preadFillsBuffer: true,

    config(key, value) {
      if (key === "file") path = runtime.resolvePath(value);
      else if (key === "dir") dir = runtime.resolvePath(value);
      else if (key === "cache") {
        if (value !== "default" && value !== "none") {
          throw new Error(`unknown cache mode: ${value}`);
        }
        cache = value;
      } else if (key === "fadvise") {
        if (value !== "normal" && value !== "random" && value !== "sequential") {
          throw new Error(`unknown fadvise mode: ${value}`);
        }
        fadvise = value;
      } else throw new Error(`unknown parameter '${key}'`);
    },

    async configComplete() {
      if (path !== undefined && dir !== undefined) {
        throw new Error("file= and dir= cannot be used at the same time");
      }
      if (dir !== undefined) {
        const info = await runtime.stat(dir);
        if (info === null) throw new Error(`${dir}: No such file or directory`);
        if (info.kind !== "directory") throw new Error(`${dir}: is not a directory`);
        return;
      }
      if (path === undefined) {
        throw new Error("you must supply either [file=]<FILENAME> or dir=<DIRNAME>");
      }
      const info = await runtime.stat(path);
      if (info === null) throw new Error(`${path}: No such file or directory`);
      if (info.kind === "directory") throw new Error(`use dir= to serve files within ${path}`);
      if (!servable(info.kind)) {
        throw new Error(`${path}: is not a regular file or block device`);
      }
    },

    async listExports() {
      if (dir === undefined) return null;
      const names = (await runtime.readDir(dir)).sort();
      const kinds: (FileKind | undefined)[] = [];
      // A few stats at a time: a directory of a million files must not queue
      // a million of them at once.
      for (let i = 0; i < names.length; i += LIST_STATS) {
        const batch = names.slice(i, i + LIST_STATS);
        const infos = await Promise.all(
          batch.map((name) => runtime.stat(`${dir}/${name}`).catch(() => null)),
        );
        kinds.push(...infos.map((info) => info?.kind));
      }
      return names.filter((_, i) => servable(kinds[i])).map((name) => ({ name }));
    },

    async open({ readonly, exportName }) {
      const target = dir === undefined ? path! : await fileInDir(dir, exportName);
      const failure = (err: unknown) =>
        dir === undefined ? nbdError(err, `open: ${target}`) : exportError(err);
      let writable = !readonly;
      let file: RandomAccessFile;
      try {
        file = await runtime.openFile(target, { write: writable }).catch((err) => {
          // As nbdkit: a file we may read but not write is served read-only.
          if (!writable || !READ_ONLY_CAUSES.has(codeOf(err) ?? "")) throw err;
          writable = false;
          return runtime.openFile(target, { write: false });
        });
      } catch (err) {
        throw failure(err);
      }
      try {
        // What was opened, not what the path named a moment before: a file
        // swapped for a directory or a device since is not served.
        if (!servable(file.kind)) {
          throw new NbdError("EINVAL", "open: not a regular file or block device any more");
        }
        if (fadvise !== "normal") await file.advise?.(0, 0, fadvise).catch(() => {});
        // A file system without SEEK_HOLE (say so by failing) gets no extents.
        const extents = file.seek !== undefined &&
          await file.seek(0, "hole").then(() => true, () => false);
        const punch = file.fallocate !== undefined;
        return {
          file,
          size: await file.size(),
          writable,
          extents,
          canPunchHole: punch,
          canZeroRange: punch,
          canAllocate: punch,
          written: [],
        };
      } catch (err) {
        await file.close();
        throw failure(err);
      }
    },

    async close(h) {
      await h.file.close();
    },

    getSize: (h) => h.size,
    canWrite: (h) => h.writable,
    canMultiConn: () => true,
    // Trim is advisory: offered only where holes can (probably) be punched.
    canTrim: (h) => h.file.fallocate !== undefined,
    canFua: () => "native",
    // nbdkit does not promise fast zeroes either: zero may end up writing them.
    canFastZero: () => false,
    canCache: (h) => h.file.advise ? "native" : "emulate",
    canExtents: (h) => h.extents,

    pread(h, buf, offset) {
      // A read the page cache held is answered synchronously: no promise.
      const reading = h.file.pread(buf, offset);
      if (!reading && cache !== "none") return;
      return (async () => {
        try {
          await reading;
        } catch (err) {
          throw nbdError(err, "pread");
        }
        if (cache === "none") await h.file.advise?.(offset, buf.length, "dontneed").catch(() => {});
      })();
    },

    async pwrite(h, buf, offset, { fua }) {
      try {
        await h.file.pwrite(buf, offset);
      } catch (err) {
        throw nbdError(err, "pwrite");
      }
      if (fua) await sync(h);
      if (cache === "none") await evict(h, buf.length, offset);
    },

    flush: sync,

    async trim(h, count, offset, { fua }) {
      if (h.canPunchHole) {
        try {
          await h.file.fallocate!("punch-hole", offset, count);
        } catch (err) {
          // Trim is advisory: only failures that may have lost data are errors.
          const code = codeOf(err);
          if (code === "EPERM" || code === "EIO") throw nbdError(err, "trim");
          if (code === "EOPNOTSUPP" || code === "ENOTSUP") h.canPunchHole = false;
        }
      }
      if (fua) await sync(h);
    },

    // nbdkit's order: a hole if the client allows it, else ZERO_RANGE, else a
    // hole filled again with allocation; ENOTSUP has the server write zeroes.
    async zero(h, count, offset, { fua, mayTrim }) {
      let done = false;
      if (h.canPunchHole && mayTrim) {
        done = await fallocate(h, "punch-hole", count, offset);
        h.canPunchHole = done;
      }
      if (!done && h.canZeroRange) {
        done = await fallocate(h, "zero-range", count, offset);
        h.canZeroRange = done;
      }
      if (!done && h.canPunchHole && h.canAllocate) {
        h.canPunchHole = await fallocate(h, "punch-hole", count, offset);
        if (h.canPunchHole) done = h.canAllocate = await fallocate(h, "allocate", count, offset);
      }
      if (!done) throw new NbdError("ENOTSUP", "zero: the file system cannot zero without writing");
      if (fua) await sync(h);
    },

    async extents(h, count, offset, { reqOne }, sink) {
      const end = offset + count;
      try {
        while (offset < end) {
          // A hole up to the next data (all the rest when no data follows).
          const data = Math.min(await h.file.seek!(offset, "data") ?? end, end);
          if (data > offset) {
            sink.add(offset, data - offset, EXTENT_HOLE | EXTENT_ZERO);
            if (reqOne) return;
          }
          offset = data;
          if (offset >= end) return;
          const hole = Math.min(await h.file.seek!(offset, "hole") ?? end, end);
          sink.add(offset, hole - offset, 0);
          if (reqOne) return;
          offset = hole;
        }
      } catch (err) {
        throw nbdError(err, `extents: ${offset}`);
      }
    },

    async cache(h, count, offset) {
      await h.file.advise!(offset, count, "willneed").catch((err) => {
        throw nbdError(err, "cache");
      });
    },
  };
}

/** The file plugin, as `nbdkit-ts file` loads it. */
export default createFilePlugin();
