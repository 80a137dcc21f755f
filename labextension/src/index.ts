/**
 * limited-provisioner's JupyterLab extension: what the current notebook's kernel may use
 * and uses now, in the status bar, and why it died, in JupyterLab's "Kernel Restarting"
 * dialog.
 *
 * Everything comes from the server extension's endpoint
 * GET /api/limited-provisioner/kernels/{kernel_id} (limited_provisioner/server/
 * handlers.py). Stock kernels answer {"limited": false}: the item stays hidden, and that
 * kernel is not asked again.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, Notification } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

/** How often the focused notebook's kernel is asked (ms). */
const POLL_MS = 2000;
/** Memory or disk use at this fraction of its limit shows the item as a warning. */
const WARN_AT = 0.8;
/** How long the died dialog may take to appear after the status says so (ms). */
const DIALOG_WAIT_MS = 5000;
/** A restart this recent (s) is the one the user is being told about. */
const FRESH_RESTART_S = 60;

/** The endpoint's answer (see kernel_status() in server/handlers.py). */
export interface IKernelStatus {
  kernel_id: string;
  limited: boolean;
  alive?: boolean;
  limits?: {
    mem_limit: number | null;
    cpu_limit: number | null;
    pids_limit: number | null;
    nofile_limit: number | null;
    disk_limit: number | null;
    files_limit: number | null;
    network: boolean;
  };
  usage?: {
    memory: number | null;
    cpu_cores: number | null;
    cpu_percent: number | null;
    pids: number;
    disk: number | null;
    files: number | null;
  } | null;
  timers?: {
    idle_timeout: number | null;
    idle_cull_in: number | null;
    exec_timeout: number | null;
    executing_for: number | null;
    exec_timeout_in: number | null;
    max_lifetime: number | null;
    lifetime_left: number | null;
  };
  enforcement?: { [limit: string]: string };
  not_enforced?: string[];
  last_exit?: { kind: string; reason: string; restarted: number | null } | null;
  last_exit_reason?: string | null;
}

/** "512M", "1.5G": binary units, as the kernelspecs write limits. */
export function formatSize(bytes: number): string {
  const units = ['B', 'K', 'M', 'G', 'T'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = value >= 10 || unit === 0 ? Math.round(value).toString() : value.toFixed(1);
  return text.replace(/\.0$/, '') + units[unit];
}

/** "45s", "9m", "2h05m". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m`;
  }
  const minutes = Math.floor((s % 3600) / 60);
  return `${Math.floor(s / 3600)}h${minutes.toString().padStart(2, '0')}m`;
}

/**
 * The item's text: "Mem 120M / 512M · CPU 3% · pids 5/64 · disk 2M / 1G · idle cull in
 * 9m", only the parts whose limit (or timer) is set.
 */
export function formatStatus(status: IKernelStatus): string {
  const lim = status.limits;
  const use = status.usage;
  const timers = status.timers;
  if (!lim) {
    return '';
  }
  if (!use) {
    return status.last_exit_reason
      ? `Kernel stopped: ${status.last_exit_reason}`
      : 'Kernel not running';
  }
  const parts: string[] = [];
  if (lim.mem_limit !== null && use.memory !== null) {
    parts.push(`Mem ${formatSize(use.memory)} / ${formatSize(lim.mem_limit)}`);
  }
  if (use.cpu_percent !== null) {
    parts.push(
      lim.cpu_limit !== null
        ? `CPU ${Math.round(use.cpu_percent)}% / ${Math.round(lim.cpu_limit * 100)}%`
        : `CPU ${Math.round(use.cpu_percent)}%`
    );
  }
  if (lim.pids_limit !== null) {
    parts.push(`pids ${use.pids}/${lim.pids_limit}`);
  }
  if (lim.disk_limit !== null && use.disk !== null) {
    parts.push(`disk ${formatSize(use.disk)} / ${formatSize(lim.disk_limit)}`);
  }
  if (timers) {
    if (timers.exec_timeout_in !== null) {
      parts.push(`exec timeout in ${formatDuration(timers.exec_timeout_in)}`);
    } else if (timers.idle_cull_in !== null) {
      parts.push(`idle cull in ${formatDuration(timers.idle_cull_in)}`);
    }
    if (timers.lifetime_left !== null) {
      parts.push(`ends in ${formatDuration(timers.lifetime_left)}`);
    }
  }
  return parts.join(' · ');
}

/** Whether memory or disk use is close to its limit. */
function nearLimit(status: IKernelStatus): boolean {
  const lim = status.limits;
  const use = status.usage;
  if (!lim || !use) {
    return false;
  }
  const near = (used: number | null, limit: number | null) =>
    used !== null && limit !== null && used >= WARN_AT * limit;
  return near(use.memory, lim.mem_limit) || near(use.disk, lim.disk_limit);
}

/** The item's tooltip: every limit, and how the host enforces each. */
function describe(status: IKernelStatus): string {
  const lines = ['Limits of this kernel (limited-provisioner):'];
  for (const [name, how] of Object.entries(status.enforcement ?? {})) {
    lines.push(`  ${name}: ${how}`);
  }
  if (status.not_enforced?.length) {
    lines.push(`Not enforced on this host: ${status.not_enforced.join(', ')}`);
  }
  if (status.last_exit_reason) {
    lines.push(`Last stopped: ${status.last_exit_reason}`);
  }
  return lines.join('\n');
}

/** Ask the endpoint about one kernel; null if it does not know the kernel (404). */
export async function fetchKernelStatus(
  kernelId: string,
  settings: ServerConnection.ISettings
): Promise<IKernelStatus | null> {
  const url = URLExt.join(
    settings.baseUrl,
    'api/limited-provisioner/kernels',
    encodeURIComponent(kernelId)
  );
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (response.status === 404) {
    return null;
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response);
  }
  return (await response.json()) as IKernelStatus;
}

/**
 * The status-bar item: follows the focused notebook's kernel, polls while it is a
 * limited kernel and the page is visible, and explains an automatic restart.
 */
export class LimitsStatus extends Widget {
  constructor(
    private readonly _tracker: INotebookTracker,
    private readonly _settings: ServerConnection.ISettings,
    private readonly _labShell: ILabShell | null
  ) {
    super();
    this.addClass('lp-LimitsStatus');
    this.node.setAttribute('data-lp-kernel', '');
    _tracker.currentChanged.connect(this._follow, this);
    // Another main-area widget (a terminal, a file) focused: hidden and not polling.
    _labShell?.currentChanged.connect(this._kernelChanged, this);
    this._follow();
    this._timer = window.setInterval(() => void this._refresh(), POLL_MS);
  }

  /** Whether the item is shown (a limited kernel in the focused notebook). */
  get active(): boolean {
    return this._active;
  }

  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  private _follow(): void {
    if (this._panel) {
      this._panel.sessionContext.kernelChanged.disconnect(this._kernelChanged, this);
      this._panel.sessionContext.statusChanged.disconnect(this._statusChanged, this);
    }
    this._panel = this._tracker.currentWidget;
    if (this._panel) {
      this._panel.sessionContext.kernelChanged.connect(this._kernelChanged, this);
      this._panel.sessionContext.statusChanged.connect(this._statusChanged, this);
    }
    this._lastExit = undefined;
    this._kernelChanged();
  }

  private _kernelChanged(): void {
    this._lastExit = undefined;
    this._show(null);
    void this._refresh();
  }

  private get _kernelId(): string | null {
    const shell = this._labShell;
    if (this._panel && shell && shell.currentWidget !== this._panel) {
      return null;
    }
    return this._panel?.sessionContext.session?.kernel?.id ?? null;
  }

  private async _refresh(): Promise<IKernelStatus | null> {
    const kernelId = this._kernelId;
    if (!kernelId || this._stock.has(kernelId) || document.hidden || this._asking) {
      return null;
    }
    this._asking = true;
    let status: IKernelStatus | null;
    try {
      status = await fetchKernelStatus(kernelId, this._settings);
    } catch (reason) {
      // The server restarting, a network hiccup: keep the last figures, ask again.
      console.debug('limited-provisioner: kernel status', reason);
      return null;
    } finally {
      this._asking = false;
    }
    if (kernelId !== this._kernelId) {
      return null; // the user moved on meanwhile
    }
    if (!status || !status.limited) {
      // A stock kernel stays one: not asked again (an unknown one, once it exists).
      if (status) {
        this._stock.add(kernelId);
      }
      this._show(null);
      return null;
    }
    if (status.alive && this._lastExit === undefined) {
      // What was known before any death this page sees: not news at the next one.
      this._lastExit = JSON.stringify(status.last_exit ?? null);
    }
    this._show(status);
    return status;
  }

  private _show(status: IKernelStatus | null): void {
    const active = status !== null;
    this.node.textContent = status ? formatStatus(status) : '';
    this.node.title = status ? describe(status) : '';
    this.node.setAttribute('data-lp-kernel', status?.kernel_id ?? '');
    this.toggleClass('lp-mod-warn', status !== null && nearLimit(status));
    if (active !== this._active) {
      this._active = active;
      this._activeChanged.emit();
    }
  }

  private _statusChanged(_: unknown, status: Kernel.Status): void {
    if (status === 'autorestarting' || status === 'dead') {
      void this._explainDeath(status);
    }
  }

  /** The kernel died: say why in JupyterLab's dialog (else in a notification). */
  private async _explainDeath(status: Kernel.Status): Promise<void> {
    const panel = this._panel;
    const kernelId = this._kernelId;
    if (!panel || !kernelId || this._stock.has(kernelId)) {
      return;
    }
    let answer: IKernelStatus | null = null;
    try {
      answer = await fetchKernelStatus(kernelId, this._settings);
    } catch (reason) {
      console.debug('limited-provisioner: kernel status', reason);
    }
    const exit = answer?.last_exit;
    if (!answer?.limited || !exit) {
      return;
    }
    const fresh =
      exit.restarted === null ||
      JSON.stringify(exit) !== this._lastExit ||
      Math.abs(Date.now() / 1000 - exit.restarted) < FRESH_RESTART_S;
    if (!fresh) {
      return; // died without a reason we know; the old one is not this death's
    }
    this._lastExit = JSON.stringify(exit);
    const text =
      status === 'dead'
        ? `The kernel stopped: ${exit.reason}.`
        : `Why: ${exit.reason}.`;
    if (!(await addToDialog(panel, text))) {
      Notification.error(`Kernel ${status === 'dead' ? 'stopped' : 'restarted'}: ${exit.reason}`, {
        autoClose: 10000
      });
    }
  }

  private _panel: NotebookPanel | null = null;
  private _timer: number;
  private _active = false;
  private _asking = false;
  private _activeChanged = new Signal<this, void>(this);
  private _stock = new Set<string>();
  // last_exit as the first healthy answer for this kernel had it (JSON), so an old
  // restart's reason is never shown for a new death.
  private _lastExit: string | undefined = undefined;
}

/**
 * Add ``text`` to JupyterLab's "Kernel Restarting" dialog of ``panel`` (NotebookPanel
 * opens it when the status turns "autorestarting"; it names the notebook's path), waiting
 * for it a few seconds. Whether a dialog was found.
 */
async function addToDialog(panel: NotebookPanel, text: string): Promise<boolean> {
  const path = panel.sessionContext.path;
  const deadline = Date.now() + DIALOG_WAIT_MS;
  while (Date.now() < deadline) {
    let found: Dialog<unknown> | undefined;
    Dialog.tracker.forEach(dialog => {
      const body = dialog.node.querySelector('.jp-Dialog-body');
      if (!found && body && path && (body.textContent ?? '').includes(path)) {
        found = dialog;
      }
    });
    if (found) {
      const body = found.node.querySelector('.jp-Dialog-body')!;
      if (!body.querySelector('.lp-DeathReason')) {
        const note = document.createElement('p');
        note.className = 'lp-DeathReason';
        note.textContent = text;
        body.appendChild(note);
      }
      return true;
    }
    await new Promise(resolve => setTimeout(resolve, 100));
  }
  return false;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'limited-provisioner:kernel-limits',
  description: "The focused notebook's kernel limits and usage, in the status bar.",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null
  ) => {
    if (!statusBar) {
      return; // e.g. a JupyterLab embedding without a status bar
    }
    const item = new LimitsStatus(tracker, app.serviceManager.serverSettings, labShell);
    statusBar.registerStatusItem(plugin.id, {
      item,
      align: 'left',
      rank: 5,
      isActive: () => item.active,
      activeStateChanged: item.activeChanged
    });
  }
};

export default plugin;
