import { createStore } from './store';

const KEY = 'sensorwire.site';

function initial(): string {
  try {
    return sessionStorage.getItem(KEY) ?? '';
  } catch {
    return '';
  }
}

/** The selected site ('' = all sites), kept for the tab's session. */
export const siteFilter = createStore<string>(initial());

siteFilter.subscribe(() => {
  try {
    sessionStorage.setItem(KEY, siteFilter.get());
  } catch {
    /* ignore */
  }
});
