/**
 * A TCP listener on every IPv6 address and no IPv4 one, for `-6` on Deno:
 * `Deno.listen` on `::` takes IPv4 clients too and has no `IPV6_V6ONLY`, so
 * the socket is made through libc and handed to Deno's `node:net`, which can
 * adopt a listening descriptor (as for socket activation).
 *
 * @module
 */
import type { Connection, Listener } from "./types.ts";
import { denoLibc, errnoReader } from "./deno_libc.ts";
import { syscallError } from "./file_syscalls.ts";

// Linux's values (x86-64 and arm64 alike).
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const IPPROTO_IPV6 = 41;
const IPV6_V6ONLY = 26;
const SOCKADDR_IN6_SIZE = 28;
const BACKLOG = 4096;

/**
 * Listen on `[::]:port` for IPv6 clients only.
 *
 * @param port The port (0: any free one).
 * @param onConnection Called for each accepted client.
 * @returns The listener, with the port actually bound.
 * @throws Without FFI, or the failed call's error (`bind: Address already in
 *   use`, the errno's name as `code`).
 */
export async function listenV6Only(
  port: number,
  onConnection: (conn: Connection) => void,
): Promise<Listener> {
  const libc = denoLibc();
  if (!libc) throw new Error("-6 needs FFI on Deno (run with -A or --allow-ffi)");
  const errno = errnoReader(libc);
  const fd = libc.socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw syscallError("socket", errno());
  try {
    const one = new Int32Array([1]);
    const address = new Uint8Array(SOCKADDR_IN6_SIZE); // in6addr_any, flow and scope 0
    const view = new DataView(address.buffer);
    view.setUint16(0, AF_INET6, true);
    view.setUint16(2, port); // network order
    const length = new Uint32Array([SOCKADDR_IN6_SIZE]);
    const check = (call: string, result: number) => {
      if (result < 0) throw syscallError(call, errno());
    };
    check("setsockopt", libc.setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, one, 4));
    check("setsockopt", libc.setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, one, 4));
    check("bind", libc.bind(fd, address, SOCKADDR_IN6_SIZE));
    check("listen", libc.listen(fd, BACKLOG));
    check("getsockname", libc.getsockname(fd, address, length));
    const bound = view.getUint16(2);
    const { nodeRuntime } = await import("./node.ts");
    const adopted = await nodeRuntime.listenFd(fd, onConnection);
    return { address: { transport: "tcp", hostname: "::", port: bound }, close: adopted.close };
  } catch (err) {
    libc.close(fd);
    throw err;
  }
}
