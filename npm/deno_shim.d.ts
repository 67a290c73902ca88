/**
 * Just enough of the `Deno` global for tsc to compile runtime/deno.ts and
 * runtime/libvirt/deno.ts into the npm package (they run when the package
 * is used from Deno, `deno run npm:nbdkit-ts`). Their real type check is
 * `deno check`, against Deno's own types; here everything Deno is `any`.
 * (Deno's full declarations, from `deno types`, clash with @types/node and
 * the DOM library.) When those files use another type of the Deno
 * namespace, tsc says "Namespace 'Deno' has no exported member": add it
 * below.
 */
declare const Deno: {
  exit(code?: number): never;
  // deno-lint-ignore no-explicit-any
  [name: string]: any;
};

// deno-lint-ignore no-explicit-any
type AnyDeno = any;

declare namespace Deno {
  type Conn = AnyDeno;
  type TcpConn = AnyDeno;
  type NetAddr = AnyDeno;
  type Listener = AnyDeno;
  type FileInfo = AnyDeno;
  type FsFile = AnyDeno;
  type Command = AnyDeno;
  type CommandStatus = AnyDeno;
  type PointerValue = AnyDeno;
  type DynamicLibrary<S> = AnyDeno;
}
