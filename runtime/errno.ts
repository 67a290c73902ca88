/**
 * The Linux errno values the server meets, by number, with their names and
 * glibc's `strerror` text: one table for the errors raised through FFI
 * (runtime/file_syscalls.ts) and for the wording of OS errors whatever the
 * runtime (server/os_message.ts).
 *
 * @module
 */

/** errno number → [name, `strerror` text]. */
export const ERRNO: Readonly<Record<number, readonly [code: string, text: string]>> = {
  1: ["EPERM", "Operation not permitted"],
  2: ["ENOENT", "No such file or directory"],
  4: ["EINTR", "Interrupted system call"],
  5: ["EIO", "Input/output error"],
  6: ["ENXIO", "No such device or address"],
  9: ["EBADF", "Bad file descriptor"],
  12: ["ENOMEM", "Cannot allocate memory"],
  13: ["EACCES", "Permission denied"],
  16: ["EBUSY", "Device or resource busy"],
  17: ["EEXIST", "File exists"],
  19: ["ENODEV", "No such device"],
  20: ["ENOTDIR", "Not a directory"],
  21: ["EISDIR", "Is a directory"],
  22: ["EINVAL", "Invalid argument"],
  25: ["ENOTTY", "Inappropriate ioctl for device"],
  26: ["ETXTBSY", "Text file busy"],
  27: ["EFBIG", "File too large"],
  28: ["ENOSPC", "No space left on device"],
  29: ["ESPIPE", "Illegal seek"],
  30: ["EROFS", "Read-only file system"],
  36: ["ENAMETOOLONG", "File name too long"],
  38: ["ENOSYS", "Function not implemented"],
  75: ["EOVERFLOW", "Value too large for defined data type"],
  95: ["EOPNOTSUPP", "Operation not supported"],
  98: ["EADDRINUSE", "Address already in use"],
  99: ["EADDRNOTAVAIL", "Cannot assign requested address"],
  111: ["ECONNREFUSED", "Connection refused"],
  122: ["EDQUOT", "Disk quota exceeded"],
};

const BY_CODE = new Map(Object.values(ERRNO));

/**
 * The `strerror` text of an errno name.
 *
 * @param code A name such as `"ENOENT"`.
 * @returns Its text, or undefined for a name not in {@linkcode ERRNO}.
 *
 * @example
 * ```ts
 * import { strerror } from "./errno.ts";
 * console.assert(strerror("ENOENT") === "No such file or directory");
 * ```
 */
export function strerror(code: string): string | undefined {
  return BY_CODE.get(code);
}
