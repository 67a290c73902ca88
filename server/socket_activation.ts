/**
 * systemd's socket activation protocol, as nbdkit reads it: the parent
 * (systemd, or libnbd's `nbdinfo -- [ nbdkit-ts … ]`) opens the listening
 * sockets and passes them as descriptors 3, 4, …, saying how many in
 * `LISTEN_FDS` and for which process in `LISTEN_PID`.
 *
 * @module
 */

/** The first descriptor passed (`SD_LISTEN_FDS_START`). */
export const LISTEN_FDS_START = 3;

/** What the environment says about socket activation. */
export type Activation =
  /** Not activated: the server opens its own socket. */
  | { kind: "none" }
  /** `LISTEN_PID` names another process (a parent's, passed on): not for us. */
  | { kind: "not-ours"; pid: number }
  /** Listen on these descriptors. */
  | { kind: "fds"; fds: number[] };

/**
 * Read `LISTEN_PID` and `LISTEN_FDS`.
 *
 * @param listenPid `LISTEN_PID`, if set.
 * @param listenFds `LISTEN_FDS`, if set.
 * @param pid This process's id.
 * @returns What to do.
 * @throws A one-line error for values that are not a count of descriptors.
 *
 * @example
 * ```ts
 * import { socketActivation } from "./socket_activation.ts";
 * const a = socketActivation("4242", "1", 4242);
 * console.assert(a.kind === "fds" && a.fds.join() === "3");
 * console.assert(socketActivation(undefined, undefined, 4242).kind === "none");
 * console.assert(socketActivation("17", "1", 4242).kind === "not-ours");
 * ```
 */
export function socketActivation(
  listenPid: string | undefined,
  listenFds: string | undefined,
  pid: number,
): Activation {
  // Both must be set, as nbdkit requires.
  if (listenPid === undefined || listenFds === undefined) return { kind: "none" };
  const owner = Number(listenPid);
  if (!/^\d+$/.test(listenPid)) throw new Error(`LISTEN_PID=${listenPid} is not a process id`);
  if (owner !== pid) return { kind: "not-ours", pid: owner };
  const count = Number(listenFds);
  if (!/^\d+$/.test(listenFds) || count < 1) {
    throw new Error(`LISTEN_FDS=${listenFds}: socket activation needs one descriptor or more`);
  }
  return { kind: "fds", fds: Array.from({ length: count }, (_, i) => LISTEN_FDS_START + i) };
}
