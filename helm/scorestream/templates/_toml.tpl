{{- /*
A TOML writer for the worker config. Helm's own toToml prints every number from a values file as
a float (16384.0), which the worker's integer fields reject; this one prints integral numbers as
integers. Tables become [a.b] headers, scalars and arrays `key = value`; null values are left out
(so a user can unset a default with `key: null`); a list of maps becomes an array of tables
(`[[route]]`), written after the tables.
*/ -}}

{{- define "scorestream.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "scorestream.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toJson $v }}
{{- else if kindIs "bool" $v -}}{{ printf "%t" $v }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "uint64" $v) -}}{{ printf "%d" $v }}
{{- else if kindIs "float64" $v -}}
{{- if eq (floor $v) $v -}}{{ printf "%d" (int64 $v) }}{{- else -}}{{ printf "%v" $v }}{{- end -}}
{{- else if kindIs "slice" $v -}}
{{- $items := list -}}
{{- range $v -}}
{{- if or (kindIs "map" .) (kindIs "invalid" .) -}}{{- fail "config: arrays of tables or nulls are not supported" -}}{{- end -}}
{{- $items = append $items (include "scorestream.toml.value" .) -}}
{{- end -}}
[{{ join ", " $items }}]
{{- else -}}{{- fail (printf "config: cannot write a %s as TOML" (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{- /* Args: dict "prefix" "a.b" (empty at top level) "table" $map */ -}}
{{- define "scorestream.toml.table" -}}
{{- $prefix := .prefix -}}
{{- $t := .table -}}
{{- range $k := keys $t | sortAlpha -}}
{{- $v := get $t $k -}}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v) (include "scorestream.toml.isTables" $v)) }}
{{ include "scorestream.toml.key" $k }} = {{ include "scorestream.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k := keys $t | sortAlpha -}}
{{- $v := get $t $k -}}
{{- if kindIs "map" $v -}}
{{- $name := include "scorestream.toml.key" $k -}}
{{- $path := ternary $name (printf "%s.%s" $prefix $name) (eq $prefix "") }}

[{{ $path }}]
{{- include "scorestream.toml.table" (dict "prefix" $path "table" $v) -}}
{{- end -}}
{{- end -}}
{{- range $k := keys $t | sortAlpha -}}
{{- $v := get $t $k -}}
{{- if include "scorestream.toml.isTables" $v -}}
{{- $name := include "scorestream.toml.key" $k -}}
{{- $path := ternary $name (printf "%s.%s" $prefix $name) (eq $prefix "") -}}
{{- range $item := $v }}

[[{{ $path }}]]
{{- include "scorestream.toml.table" (dict "prefix" $path "table" $item) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* "true" when the value is a non-empty list whose items are all maps (an array of tables). */ -}}
{{- define "scorestream.toml.isTables" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}
{{- $all := true -}}
{{- range . -}}{{- if not (kindIs "map" .) -}}{{- $all = false -}}{{- end -}}{{- end -}}
{{- if $all -}}true{{- end -}}
{{- end -}}
{{- end -}}
