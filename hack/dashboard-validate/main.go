// Command dashboard-validate checks Grafana dashboard JSON files against Grafana's dashboard
// schema as the Grafana Foundation SDK generates it: the dashboard model, every panel plugin's
// options and field config, and every Prometheus query. A key the schema does not know, a value
// of the wrong type or outside its enum, and a failed schema constraint are errors; Grafana
// would drop or misread them without a word. A missing field is not: Grafana fills it with the
// schema's default when it loads the dashboard, so hand-written dashboards may leave it out.
//
// Usage: dashboard-validate FILE...   One line per problem; exit status 1 when any file fails.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

const missingField = "required field is missing from input"

func problems(path string) ([]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var board dashboard.Dashboard
	err = board.UnmarshalJSONStrict(raw)
	var found []string
	var buildErrs cog.BuildErrors
	switch {
	case err == nil:
		if err := board.Validate(); err != nil {
			found = append(found, err.Error())
		}
	case errors.As(err, &buildErrs):
		for _, e := range buildErrs {
			if e.Message != missingField {
				found = append(found, e.Error())
			}
		}
	default:
		found = append(found, err.Error()) // not JSON, or not an object
	}
	return found, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dashboard-validate FILE...")
		os.Exit(2)
	}
	// A panel's options and its queries are checked only against the plugins registered here.
	plugins.RegisterDefaultPlugins()
	failed := false
	for _, path := range os.Args[1:] {
		found, err := problems(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		for _, p := range found {
			fmt.Printf("%s: %s\n", path, p)
		}
		if len(found) > 0 {
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}
